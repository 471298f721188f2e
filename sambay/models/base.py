"""What both model families share: the calling convention the engine uses (`CausalLM.forward` with
or without a decode state), the output head, and random initialization for training from scratch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sambay.errors import SambayError
from sambay.ops import TORCH, Ops
from sambay.models.state import DecodeState, Positions

# Parameters kept in float32 whatever the model dtype, as in the released checkpoint.
FP32_PARAMS = ("A_log", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


class CausalLM(nn.Module):
    """What every model family shares: the engine's calling convention, positions, the output head.

    A family subclass has `config`, `model.embed_tokens`, `model.layers` (each with
    `state_shapes(batch, max_length)`), and `_body(h, at, keep, hidden)` running its layers and final
    norm. `lm_head` None means the head is the tied embedding; quantization may install its own module.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.lm_head: nn.Module | None = None
        # Where the model came from and what its generation_config.json recommends (set by the loader).
        self.source: str = ""
        self.generation_config: dict = {}
        # The decode-time operations its layers call: PyTorch unless the model was prepared for
        # inference with native kernels (sambay.kernels.prepare_for_inference).
        self.ops: Ops = TORCH

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_state(self, batch_size: int = 1, max_length: int | None = None) -> DecodeState:
        max_length = max_length or self.config.max_position_embeddings
        return DecodeState(self, batch_size, max_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                state: DecodeState | None = None, logits_to_keep: int | None = None,
                output_hidden_states: bool = False):
        """input_ids (B, T). attention_mask (B, T): 0 marks left padding.

        Without a state: one causal forward; logits for all T positions unless `logits_to_keep`.
        With a state: consumes the tokens after those it holds and returns the logits of the last
        `logits_to_keep` (default 1) positions (SambaY runs only those through its cross-decoder).
        """
        B, T = input_ids.shape
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.to(torch.bool))
        if state is None:
            pos = torch.arange(T, device=input_ids.device).expand(B, T)
            keep = T if logits_to_keep in (None, 0) else logits_to_keep
        else:
            pos = self._claim_positions(state, valid)
            keep = 1 if logits_to_keep is None else (T if logits_to_keep == 0 else logits_to_keep)
        at = Positions(pos, valid, state, self.ops)
        if keep < 1 or keep > T:
            raise SambayError(f"logits_to_keep must be between 1 and the number of tokens ({T}), got {keep}")

        h = self.model.embed_dropout(self.model.embed_tokens(input_ids)).float()
        hidden = [h] if output_hidden_states else None
        h = self._body(h, at, keep, hidden)  # (B, keep, d), final norm applied
        if hidden is not None:
            hidden[-1] = h
        logits = self.logits(h[:, -keep:])
        if state is not None:
            state.lengths += T
        return (logits, hidden) if output_hidden_states else logits

    def _body(self, h: torch.Tensor, at: Positions, keep: int, hidden: list | None) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(h).float()
        return F.linear(h, self.model.embed_tokens.weight).float()

    def _claim_positions(self, state: DecodeState, valid: torch.Tensor) -> torch.Tensor:
        """Check the call fits the state, mark the new positions valid, and return them (B, T)."""
        B, T = valid.shape
        if B != state.batch_size:
            raise SambayError(f"input has batch size {B} but the state was made for {state.batch_size}")
        if T > 1 and not bool((state.lengths == state.lengths[0]).all()):
            raise SambayError("a multi-token call with a state needs every row at the same length; "
                              "prefill rows of different lengths one at a time with state.rows(i)")
        if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise SambayError("attention_mask may only mark padding at the start of a row (left padding)")
        if not bool(valid.all()) and bool((state.lengths > 0).any()):
            raise SambayError("padding is only allowed in the first call on a state (the prompt)")
        end = int(state.lengths.max()) + T
        if end > state.max_length:
            raise SambayError(f"the sequence would reach {end} tokens but the state holds at most "
                              f"{state.max_length}; make the state with a larger max_length")
        pos = state.lengths.unsqueeze(1) + torch.arange(T, device=valid.device)
        state.valid.scatter_(1, pos, valid)
        return pos

    def init_weights(self, seed: int = 0, fast: bool = False) -> CausalLM:
        """Random initialization for training from scratch (Mamba's own init for its SSM parts).

        fast: fill large matrices by tiling one pool of 4M random normals instead of drawing every
        value: the same scales at memory speed (seconds, not minutes, for 3.8B parameters). Meant
        for speed benchmarks with random weights, not for training.
        """
        g = torch.Generator().manual_seed(seed)
        pool = torch.randn(_POOL, generator=g) if fast else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            _init_param(name, p, std, self.config, g, pool)
        return self




_POOL = 1 << 22


@torch.no_grad()
def _init_param(name: str, p: torch.Tensor, std: float, cfg, g: torch.Generator,
                pool: torch.Tensor | None = None) -> None:
    def normal(mean: float, s: float):
        if pool is None or p.numel() <= _POOL:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * s + mean)
            return
        flat, src = p.view(-1), pool.to(p.dtype)
        start = int(torch.randint(0, _POOL // 2, (1,), generator=g))
        for off in range(0, flat.numel(), _POOL - start):
            n = min(_POOL - start, flat.numel() - off)
            flat[off:off + n].copy_(src[start:start + n])
        flat.mul_(s).add_(mean)

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "A_log":  # A = -(1..n) per channel, the S4D-real init
        p.copy_(torch.log(torch.arange(1, p.shape[1] + 1, dtype=torch.float32)).expand_as(p))
    elif leaf == "D":
        p.fill_(1.0)
    elif name.endswith("dt_proj.bias"):  # softplus^-1 of dt log-uniform in [1e-3, 1e-1]
        u = torch.rand(p.shape, generator=g)
        dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        p.copy_(dt + torch.log(-torch.expm1(-dt)))
    elif name.endswith("dt_proj.weight"):
        r = cfg.dt_rank ** -0.5
        p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * r)
    elif leaf.startswith("lambda_"):
        normal(0.0, 0.1)
    elif name.endswith("conv1d.weight"):
        k = p.shape[-1]
        p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(k))
    elif leaf == "bias":
        p.zero_()
    elif "layernorm" in name or "subln" in name or name.endswith("norm.weight"):
        p.fill_(1.0)
    elif name.endswith(("out_proj.weight", "fc2.weight", "o_proj.weight", "down_proj.weight")):
        normal(0.0, std / math.sqrt(2 * cfg.num_hidden_layers))  # scaled residual projections
    else:
        normal(0.0, std)
