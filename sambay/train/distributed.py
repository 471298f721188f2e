"""Data-parallel training over several processes, and the full-state views that checkpoints need.

Launch the same `sambay train` command under torchrun; the process group is found from the
environment variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), as in nanoGPT:

    torchrun --standalone --nproc_per_node 4 -m sambay train --preset small --data DATA --out OUT
    torchrun --standalone --nproc_per_node 4 -m sambay train ... --fsdp   # shard weights + state

Every rank holds a replica (DDP, the default) or a shard per decoder layer (FSDP2 `fully_shard`,
with --fsdp). gloo on CPU, nccl on GPU. Checkpoints hold *full* tensors, gathered to plain CPU
tensors on every rank and written by rank 0, so a checkpoint does not depend on how it was sharded.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sambay.errors import SambayError


@dataclass
class DistEnv:
    """Where this process sits: rank `rank` of `world_size`, on `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> DistEnv:
    """Join the process group torchrun describes in the environment; a plain process is rank 0 of 1."""
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistEnv(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return DistEnv(rank, world, local, device)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Wrapping
# ---------------------------------------------------------------------------------------------


def wrap(model: nn.Module, env: DistEnv, fsdp: bool) -> nn.Module:
    """DDP replica or FSDP2 shards (one unit per decoder layer, then the root for the rest).

    FSDP2 changes `model` in place (its parameters become DTensor shards under the same names), so
    the returned module is `model` itself; DDP returns a wrapper whose `.module` is `model`.
    """
    if not env.distributed:
        return model
    if fsdp:
        try:  # optional: FSDP2 exists from torch 2.6 on, and sambay runs on torch >= 2.4
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise SambayError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                              f"this is torch {torch.__version__}. Drop --fsdp to train with DDP") from None
        # A decoder layer returns the shared memory / K/V views beside the hidden state; FSDP2 warns
        # that in-place ops on such views would skip its hooks. The model never modifies them.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def gradient_sync(model: nn.Module, sync: bool):
    """Context for one micro-step: skip the gradient all-reduce unless `sync` (the last micro-step)."""
    if isinstance(model, DDP):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------


def mean(value: torch.Tensor, env: DistEnv) -> float:
    """The mean of a scalar over all ranks (every rank gets it)."""
    t = value.detach().float().reshape(1).to(env.device)
    if env.distributed:
        dist.all_reduce(t)
        t /= env.world_size
    return float(t)


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is true on any (e.g. one rank got SIGTERM)."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order (JSON-like data only)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def check_same(value: Any, what: str, env: DistEnv) -> None:
    """Fail on every rank if the ranks disagree (they must have been started with the same command)."""
    values = gather(value, env)
    if any(v != values[0] for v in values):
        raise SambayError(f"the ranks disagree about {what}: {values}; start every rank with the "
                          f"same command and data")


# ---------------------------------------------------------------------------------------------
# Full state of model and optimizer (collective under FSDP: call on every rank)
# ---------------------------------------------------------------------------------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # DTensor shard -> the whole tensor (all-gather)
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copy of the parameters and buffers, under the Hugging Face names."""
    return {name: _full(t) for name, t in unwrap(model).state_dict().items()}


def optimizer_state(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]
                    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's per-parameter tensors as `{param_name}:{key}` -> full CPU tensor, and its
    groups' hyper-parameters (JSON) with parameters listed by name instead of position."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{names[p]}:{key}"] = _full(value)
                else:
                    raise SambayError(f"cannot checkpoint optimizer state {key!r} of type "
                                      f"{type(value).__name__}")
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": [names[p] for p in group["params"]]})
    return tensors, groups


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str],
                         tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    """Inverse of `optimizer_state`: full tensors are cut back into this rank's shards (FSDP)."""
    if len(groups) != len(optimizer.param_groups):
        raise SambayError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this run "
                          f"{len(optimizer.param_groups)}; it was written by a different trainer")
    state: dict[int, dict[str, torch.Tensor]] = {}
    saved_groups = []
    index = 0
    for saved, group in zip(groups, optimizer.param_groups):
        mine = [names[p] for p in group["params"]]
        if saved["params"] != mine:
            raise SambayError("the checkpoint's optimizer lists different parameters than this model; "
                              "it belongs to a different model")
        for p, name in zip(group["params"], mine):
            entry = {}
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                t = tensors.get(f"{name}:{key}")
                if t is None:
                    continue
                if key != "step" and hasattr(p, "device_mesh"):  # FSDP2: keep only this rank's shard
                    # Optional, like FSDP2 itself (see wrap): only a run under --fsdp gets here.
                    from torch.distributed.tensor import distribute_tensor

                    t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                entry[key] = t
            if entry:
                state[index] = entry
            index += 1
        hyper = {k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"}
        saved_groups.append({**hyper, "params": list(range(index - len(mine), index))})
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})


# ---------------------------------------------------------------------------------------------
# Random number generators (per rank: dropout masks differ between ranks)
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's generator states as JSON-ready data."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [version, list(mt), gauss],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, mt, py_gauss = state["python"]
    random.setstate((version, tuple(mt), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def seed_everything(seed: int, env: DistEnv) -> None:
    """Seed this rank's generators: the same seed gives the same run, ranks draw different masks."""
    s = seed + 1_000_003 * env.rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
