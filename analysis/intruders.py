"""Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228).

For a pretrained W0 and a fine-tuned W = W0 + ΔW (both (out, in)), with left singular vectors u_i of W0 and
y_j of W (in order of decreasing singular value): y_j is an *intruder dimension* when it is nearly orthogonal
to every singular vector of W0, max_i |cos(y_j, u_i)| < ε, among the top k of W (the paper's §4 definition;
k = 10 and ε = 0.5 are PEFT's defaults, ``peft.tuners.lora.intruders.reduce_intruder_dimension``, which reads
left singular vectors the same way). The mitigation (the paper's §6, PEFT's) scales each intruder's singular
value by λ: W' = W + (λ − 1) Σ_{j intruder} σ_j y_j v_jᵀ, so ΔW' = W' − W0.

Pure functions on tensors (float64 inside); the command is ``analysis.commands.intruders``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Intruders:
    max_cos: np.ndarray      # (k,): max_i |cos(y_j, u_i)| for W's top-k left singular vectors y_j
    indices: list[int]       # the j (0-based, among the top k) with max_cos < ε
    epsilon: float

    @property
    def count(self) -> int:
        return len(self.indices)

    def count_at(self, epsilon: float) -> int:
        """The number of intruders at another threshold (same top k)."""
        return int((self.max_cos < epsilon).sum())


def _svd(w: torch.Tensor):
    return torch.linalg.svd(torch.as_tensor(w).double(), full_matrices=False)


def max_cosines(w0: torch.Tensor, w: torch.Tensor, k: int = 10) -> np.ndarray:
    """max_i |⟨y_j, u_i⟩| for the top-``k`` left singular vectors y_j of ``w`` against all of ``w0``'s u_i (unit
    vectors, so the inner product is the cosine)."""
    u0 = _svd(w0)[0]
    u = _svd(w)[0][:, :k]
    return (u.T @ u0).abs().max(dim=1).values.numpy()


def find(w0: torch.Tensor, delta: torch.Tensor, k: int = 10, epsilon: float = 0.5) -> Intruders:
    """The intruder dimensions of W0 + ΔW among its top ``k`` singular vectors, at threshold ``epsilon``."""
    if k <= 0 or not 0 < epsilon <= 1:
        raise ValueError(f"k={k}, epsilon={epsilon}: need k >= 1 and 0 < epsilon <= 1 (the paper: k=10, ε=0.5)")
    w0 = torch.as_tensor(w0).double()
    cos = max_cosines(w0, w0 + torch.as_tensor(delta).double(), k)
    return Intruders(cos, [int(j) for j in np.flatnonzero(cos < epsilon)], float(epsilon))


def mitigate(w0: torch.Tensor, delta: torch.Tensor, indices: list[int], lam: float) -> torch.Tensor:
    """ΔW' (float64) after scaling the singular values of W0 + ΔW at ``indices`` by ``lam``."""
    w0 = torch.as_tensor(w0).double()
    w = w0 + torch.as_tensor(delta).double()
    if not indices:
        return w - w0
    u, s, vh = _svd(w)
    idx = torch.as_tensor(indices)
    intruding = (u[:, idx] * s[idx]) @ vh[idx]
    return w + (lam - 1.0) * intruding - w0
