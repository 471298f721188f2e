"""Hugging Face checkpoint folders: find, load (memory-mapped, any dtype) and save (sharded).

Only safetensors are ever read: a `pytorch_model.bin` is refused, because unpickling runs code.
Every problem a user can cause (wrong path, wrong architecture, missing or corrupt files, tensors
that do not fit the config) raises a SambayError that names the file or tensor at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sambay.errors import SambayError
from sambay.files import atomic_path, atomic_write_text, is_hub_id, read_json
from sambay.kernels.linear import PackedLinear
from sambay.kernels.prepare import int4_format_of, int4_skeleton, int8_layer_names, int8_skeleton, quantization_of
from sambay.models import PRESETS, CausalLM, build_model, load_config, preset
from sambay.models.base import FP32_PARAMS
from sambay.quant import QUANT_METHOD
from sambay.quant.int4 import QUANT_METHOD_INT4, Int4Format

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MODEL_DIR = Path(__file__).parent.parent / "default_model"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*", "vocab*", "merges*"]


def resolve_model(name: str | os.PathLike | None) -> Path | str:
    """Turn what a user typed into a local folder, or a preset name.

    None -> the embedded default model; an existing folder -> itself; a preset name -> the name
    (random weights); `owner/name` -> a Hugging Face repo, downloaded (or taken from the cache).
    """
    if name is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise SambayError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                              f"pass --model PATH (a Hugging Face folder) or a preset with --random-weights")
        return DEFAULT_MODEL_DIR
    path = Path(os.path.expanduser(str(name)))
    if path.is_dir():
        return path
    if str(name) in PRESETS:
        return str(name)
    if path.exists():
        raise SambayError(f"{path} is a file; --model takes a model folder (config.json + *.safetensors)")
    text = str(name)
    if is_hub_id(text):
        return _from_hub(text)
    raise SambayError(f"no model folder at {path}; give a folder with config.json and *.safetensors, "
                      f"a Hugging Face repo id like microsoft/Phi-4-mini-flash-reasoning, or a preset "
                      f"({', '.join(PRESETS)})")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise SambayError(f"Hugging Face has no repo {repo_id!r} (or it is private: log in with "
                          f"`hf auth login`)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        try:  # offline: fall back to a complete copy in the local cache
            return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except Exception:
            raise SambayError(f"cannot download {repo_id} ({type(e).__name__}) and it is not in the "
                              f"local Hugging Face cache; connect to the internet once, or download it "
                              f"elsewhere and pass the folder with --model") from None


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
               random_weights: bool = False, seed: int = 0) -> CausalLM:
    """Load a SambaY (or Phi3 baseline) model from a Hugging Face folder, or a preset with random weights.

    dtype: the weights' dtype (default: the checkpoint's `torch_dtype`, float32 for presets).
    A_log and the differential-attention lambdas always stay float32, as in the released files.
    """
    where = resolve_model(path)
    if isinstance(where, str):  # a preset: random weights, built straight in the target dtype
        cfg = preset(where)
        model = build_model(cfg, dtype or torch.float32, init=True, seed=seed, fast_init=True)
        model.source = f"preset {where} (random weights)"
        return model
    cfg = load_config(where / "config.json")
    if dtype is None:
        dtype = getattr(torch, str(cfg.torch_dtype), torch.float32)
    qcfg = cfg.extra.get("quantization_config") or {}
    quant = qcfg.get("quant_method")
    if quant not in (None, QUANT_METHOD, QUANT_METHOD_INT4):
        raise SambayError(f"{where} is quantized with {quant!r}, which sambay cannot load; use the "
                          f"unquantized checkpoint (sambay quantizes it itself with --quantize int8)")
    if random_weights:
        model = build_model(cfg, dtype, init=True, seed=seed, fast_init=True)
    else:
        model = build_model(cfg, dtype, device="meta")
        if quant == QUANT_METHOD_INT4:  # the format and per-tensor policy are in quantization_config
            int4_skeleton(model, Int4Format.parse(str(qcfg.get("format"))), list(qcfg.get("int8_layers", [])))
        elif quant:
            int8_skeleton(model)
        _load_weights(model, where)
    model.generation_config = read_json(where / "generation_config.json", {})
    model.source = str(where)
    return model.eval()


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = folder / INDEX_FILE
    single = folder / SINGLE_FILE
    if index.exists():
        data = read_json(index, {})
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SambayError(f"{index} has no weight_map; re-download or re-export the checkpoint")
        files = {name: folder / f for name, f in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.exists()})
        if missing:
            raise SambayError(f"{index} names shard(s) missing from {folder}: {', '.join(missing)}; "
                              f"the download is incomplete")
        return files
    if single.exists():
        return {name: single for name in _open(single).keys()}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise SambayError(f"{folder} has only pickle weights (*.bin/*.pt); sambay loads safetensors only, "
                          f"since unpickling can run arbitrary code. Convert them to model.safetensors "
                          f"with a tool you trust")
    raise SambayError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise SambayError(f"{file} is not a readable safetensors file ({e}); it is truncated or corrupt, "
                          f"re-download or re-export it") from None


def _load_weights(model: CausalLM, folder: Path) -> None:
    """Assign the checkpoint's tensors to a meta-device model, converting to its dtypes."""
    expected = {k: v for k, v in model.state_dict().items()}
    files = weight_files(folder)
    names = set(files)
    if "lm_head.weight" not in expected:  # a tied head may be stored too; the embedding is used
        names.discard("lm_head.weight")
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise SambayError("checkpoint does not match its config.json: " + "; ".join(
            f"{what} {len(ks)} tensor(s): {', '.join(ks[:5])}{' ...' if len(ks) > 5 else ''}"
            for what, ks in (("missing", missing), ("unexpected", unexpected)) if ks))
    loaded: dict[str, torch.Tensor] = {}
    handles: dict[Path, Any] = {}
    for name, file in sorted(files.items(), key=lambda kv: str(kv[1])):
        if name not in expected:
            continue
        f = handles.get(file) or handles.setdefault(file, _open(file))
        try:
            t = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise SambayError(f"cannot read tensor {name} from {file} ({e}); the file is truncated or "
                              f"corrupt, re-download it") from None
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise SambayError(f"tensor {name} in {file.name} has shape {list(t.shape)}, but config.json "
                              f"implies {list(want.shape)}; the config and the weights do not belong "
                              f"together")
        packed = (torch.int8, torch.uint8)
        if t.dtype != want.dtype and (t.dtype in packed or want.dtype in packed):
            raise SambayError(f"tensor {name} in {file.name} is {t.dtype}, expected {want.dtype}; "
                              f"the config's quantization_config and the weights disagree")
        loaded[name] = t.to(want.dtype)
    model.load_state_dict(loaded, strict=True, assign=True)


def save_model(model: CausalLM, folder: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3,
               dtype: torch.dtype | None = None, tokenizer=None) -> Path:
    """Write `model` as a Hugging Face folder loadable by sambay and the reference code.

    Shards when larger than `max_shard_bytes`. Each file is written to a temp name and renamed, so
    an interrupted save never leaves a half-written file behind.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    dtype = dtype or model.dtype
    quantized = quantization_of(model)
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("lm_head.") and cfg.tie_word_embeddings and not quantized:
            continue  # the tied head is the embedding
        if t.dtype in (torch.int8, torch.uint8) or name.endswith("weight_scale"):
            state[name] = t.detach().contiguous()
            continue
        keep32 = name.rsplit(".", 1)[-1] in FP32_PARAMS
        state[name] = t.detach().to(torch.float32 if keep32 else dtype).contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    for stale in list(folder.glob("model-*-of-*.safetensors")) + [folder / INDEX_FILE, folder / SINGLE_FILE]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        _save(shards[0], folder / SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save(shard, folder / fname)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_text(folder / INDEX_FILE, json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    saved_cfg = cfg.replace(torch_dtype=str(dtype).removeprefix("torch."))
    if quantized == "int4":
        lin = next(m for m in model.modules() if isinstance(m, PackedLinear) and m.int4)
        saved_cfg.extra = {**saved_cfg.extra, "quantization_config": {
            "quant_method": QUANT_METHOD_INT4, "bits": 4, "format": int4_format_of(lin).name,
            "scheme": "group-wise 4-bit, float16 scale (and min) per group, rows in blocks of 4 "
                      "(sambay.quant.int4); dt_proj unquantized",
            "int8_layers": int8_layer_names(model)}}
    elif quantized:
        saved_cfg.extra = {**saved_cfg.extra, "quantization_config": {
            "quant_method": QUANT_METHOD, "bits": 8, "scheme": "symmetric per-output-row",
            "modules": "all linear layers except dt_proj, plus the output head (lm_head)"}}
    else:
        saved_cfg.extra = {k: v for k, v in saved_cfg.extra.items() if k != "quantization_config"}
    saved_cfg.to_json(folder / "config.json")
    gen = dict(model.generation_config)
    gen.setdefault("bos_token_id", cfg.bos_token_id)
    gen.setdefault("eos_token_id", cfg.eos_token_id)
    gen.setdefault("pad_token_id", cfg.pad_token_id)
    atomic_write_text(folder / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
