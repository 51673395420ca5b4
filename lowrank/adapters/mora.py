"""MoRA (Jiang et al., 2024, arXiv 2405.12130): a high-rank update from one square matrix.

h = W0 x + f_decomp(M f_comp(x)), M (r̂ × r̂) trainable and zero at initialisation, f_comp: R^in → R^r̂
and f_decomp: R^r̂ → R^out fixed (no parameters), so ΔW = D · M · C is linear in M and its rank can
reach r̂ (or more, with rotation), against r for LoRA. The scale is 1 (MoRA has no α).

r̂ matches LoRA-r's parameter count, r̂² ≈ (in + out)·r: r̂ = ⌊√((in + out)·r) + 0.5⌋ (the official
code, kongds/MoRA ``peft-mora/src/peft/tuners/lora/layer.py`` ``update_layer``, rounds to nearest),
made even for rotation.

The operators, by the official code's ``mora_type`` (§3 of the paper):

- 0 ``truncation`` (the paper's first example; not in the official code): f_comp(x) = x[:r̂],
  f_decomp(y) = [y; 0];
- 1 ``sharing`` (Eq. 6): x, extended cyclically by its first elements to a multiple of r̂, is cut into
  chunks of r̂ that are summed; the output repeats y cyclically to length out;
- 2 ``decoupling`` both ways: x is split into r̂ neighbouring groups (the first in − r̂⌊in/r̂⌋ of size
  ⌈in/r̂⌉, the rest ⌊in/r̂⌋) that are summed; each y_i is repeated over its group of outputs
  (``repeat_interleave``);
- 3 decoupling in, sharing out; 4 sharing in, decoupling out (the official code's mixed types);
- 6 ``rotation`` (Eq. 9): x extended cyclically to k = ⌈in/r̂⌉ chunks of r̂; chunk i is rotated by
  RoPE's R_i (angles i·θ_j, θ_j = 10000^(−2j/r̂), the halves-rotation of the official code) and each
  rotated chunk goes through M separately, so ΔW is the block row [M R_0, ..., M R_{k−1}] placed
  block-diagonally, the k·r̂ outputs then cut (or cyclically repeated) to out.

The official README: sharing (type 1) for large ranks, rotation (type 6) for small ones; the default
(``mora_type=None``) takes rotation for LoRA rank r < 128 and sharing otherwise. The forward pass uses
the reshaping operators (no dense ΔW); ``delta_weight`` forms D · blockdiag(M R_i) · C from explicit
0/1 compression and decompression matrices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.adapters.base import AdaptedLayer, no_slices

TYPES = {0: "truncation", 1: "sharing", 2: "decoupling", 3: "decoupling/sharing", 4: "sharing/decoupling",
         6: "rotation"}
LARGE_RANK = 128  # from here on the default is sharing (type 1), below it rotation (type 6)


def mora_rank(in_features: int, out_features: int, rank: int, mora_type: int) -> int:
    """r̂ with r̂² ≈ (in + out)·r, rounded to nearest as the official code does (even for rotation)."""
    r_hat = int(math.sqrt((in_features + out_features) * rank) + 0.5)
    return r_hat // 2 * 2 if mora_type == 6 else r_hat


def default_type(rank: int) -> int:
    return 6 if rank < LARGE_RANK else 1


def _groups(n: int, r: int) -> torch.Tensor:
    """The group (0..r−1) of each of n positions under decoupling: the first n − r⌊n/r⌋ groups hold
    ⌈n/r⌉ neighbours, the rest ⌊n/r⌋."""
    big, small = n // r + 1, n // r
    m = n - r * small
    return torch.cat([torch.arange(m).repeat_interleave(big), torch.arange(m, r).repeat_interleave(small)])


def compression(in_features: int, r: int, mora_type: int) -> torch.Tensor:
    """C as a 0/1 matrix: (r, in), or (k·r, in) for rotation (the cyclic extension to k chunks)."""
    if mora_type == 0:
        return torch.eye(r, in_features)
    if mora_type in (2, 3):
        return F.one_hot(_groups(in_features, r), r).t().float()
    k = -(-in_features // r)
    cyclic = F.one_hot(torch.arange(k * r) % in_features, in_features).float()   # (k·r, in)
    if mora_type == 6:
        return cyclic
    return cyclic.view(k, r, in_features).sum(0)                                 # sharing: sum the chunks


def decompression(out_features: int, r: int, mora_type: int, width: int) -> torch.Tensor:
    """D as a 0/1 matrix (out, width): width = r, or k·r for rotation."""
    if mora_type == 0:
        return torch.eye(out_features, width)
    if mora_type in (2, 4):
        return F.one_hot(_groups(out_features, r), r).float()
    return F.one_hot(torch.arange(out_features) % width, width).float()           # cyclic repetition


def rotations(r: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin for chunk i at frequency θ_j (each (chunks, r), halves layout)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    freqs = torch.outer(torch.arange(chunks, dtype=torch.float64), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


class MoRA(AdaptedLayer):
    adapter_name = "mora"

    def __init__(self, base: nn.Module, rank: int, *, mora_type: int | None = None, dropout: float = 0.0):
        super().__init__(base)
        if self.kind not in ("linear", "conv1d"):
            raise ValueError(f"MoRA adapts nn.Linear or GPT-2 Conv1D layers, not a {type(base).__name__}")
        mora_type = default_type(rank) if mora_type is None else mora_type
        if mora_type not in TYPES:
            raise ValueError(f"mora_type={mora_type!r} is not one of {sorted(TYPES)} "
                             f"({', '.join(f'{k}={v}' for k, v in TYPES.items())})")
        self.rank, self.mora_type = rank, mora_type
        r = mora_rank(self.in_features, self.out_features, rank, mora_type)
        if r > min(self.in_features, self.out_features) or r < 2:
            raise ValueError(f"MoRA's r̂={r} (from rank={rank}) does not fit a {self.out_features}×{self.in_features} "
                             f"matrix; choose a rank with √((in+out)·rank) <= {min(self.in_features, self.out_features)}")
        self.r_hat = r
        self.chunks = -(-self.in_features // r)
        self.mora_M = nn.Parameter(torch.zeros(r, r, dtype=torch.float32, device=base.weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if mora_type == 6:
            cos, sin = rotations(r, self.chunks)
            self.register_buffer("_cos", cos, persistent=False)   # float64: cast where used
            self.register_buffer("_sin", sin, persistent=False)

    # ---- the operators on activations --------------------------------------------------------------
    def _compress(self, x: torch.Tensor) -> torch.Tensor:
        n, r, t = self.in_features, self.r_hat, self.mora_type
        if t == 0:
            return x[..., :r]
        if t in (2, 3):
            big, small = n // r + 1, n // r
            m = n - r * small
            head = x[..., :m * big].unflatten(-1, (m, big)).sum(-1)
            tail = x[..., m * big:].unflatten(-1, (r - m, small)).sum(-1)
            return torch.cat([head, tail], dim=-1)
        pad = self.chunks * r - n
        if pad:
            x = torch.cat([x, x[..., :pad]], dim=-1)
        x = x.unflatten(-1, (self.chunks, r))
        if t == 6:
            half = r // 2
            rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
            return x * self._cos.to(x.dtype) + rotated * self._sin.to(x.dtype)   # (..., k, r)
        return x.sum(-2)

    def _decompress(self, y: torch.Tensor) -> torch.Tensor:
        out, r, t = self.out_features, self.r_hat, self.mora_type
        if t == 0:
            return F.pad(y, (0, out - r))
        if t in (2, 4):
            big, small = out // r + 1, out // r
            m = out - r * small
            return torch.cat([y[..., :m].repeat_interleave(big, -1), y[..., m:].repeat_interleave(small, -1)], -1)
        if t == 6:
            y = y.flatten(-2)
        reps = -(-out // y.shape[-1])
        return y.repeat(*([1] * (y.dim() - 1)), reps)[..., :out]

    def mora_output(self, x: torch.Tensor) -> torch.Tensor:
        return self._decompress(F.linear(self._compress(x), self.mora_M.to(x.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.mora_output(self.dropout(x)).to(y.dtype)

    # ---- ΔW as matrices ---------------------------------------------------------------------------
    def _update_matrix(self) -> torch.Tensor:
        """ΔW = D · blockdiag(M R_i) · C, (out, in), float32."""
        r, t, M = self.r_hat, self.mora_type, self.mora_M
        C = compression(self.in_features, r, t).to(M)
        if t == 6:
            cos, sin = self._cos.to(M.dtype), self._sin.to(M.dtype)   # (k, r)
            half = r // 2
            swap = torch.cat([M[:, half:], -M[:, :half]], dim=1)      # M · (rotate-half)ᵀ pattern
            blocks = M[None] * cos[:, None, :] + swap[None] * sin[:, None, :]   # (k, r, r): M R_i
            core = torch.block_diag(*blocks)
        else:
            core = M
        D = decompression(self.out_features, r, t, core.shape[0]).to(M)
        return D @ core @ C

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, r_hat={self.r_hat}, "
                f"mora_type={self.mora_type} ({TYPES[self.mora_type]})")


def build(target, rank: int, alpha: float | None, options: dict) -> MoRA:
    """The registry's constructor (whole matrices; α is not used by MoRA)."""
    no_slices("mora", target)
    return MoRA(target.module, rank, mora_type=options.get("mora_type"), dropout=options.get("dropout", 0.0))
