"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): ΔW = P Λ Q with the rank allocated by importance.

The update (§3.1): P (out, r) and Q (r, in) hold left/right "singular vectors", Λ = diag(λ) the singular
values (``lora_E``, shape (r, 1) as in PEFT); ΔW = s · P diag(λ) Q with PEFT's scale s = α / (r + 10⁻⁵)
(PEFT 0.21 ``SVDLinear``: ``scaling / (ranknum + 1e-5)``, ranknum = the initial rank r). λ starts at zero and
P, Q at N(0, 0.02²) (the official code, QingruZhang/AdaLoRA ``loralib/adalora.py``, and PEFT), so ΔW = 0 at
step 0. The layer exposes ``lora_B`` = P and ``lora_A`` = diag(λ) Q, so ΔW = s · lora_B @ lora_A as for every
LoRA-family layer (and DoRA's code runs unchanged on it: ``AdaDoRA``).

The allocation (§3.2–3.3), run by ``RankAllocator`` after every optimizer step (``after_step``; PEFT's
``update_and_allocate``):

- sensitivity of every entry w of P, λ, Q: I = |w · ∂L/∂w|; smoothed Ī ← β1 Ī + (1 − β1) I; uncertainty
  Ū ← β2 Ū + (1 − β2) |I − Ī|; score s(w) = Ī · Ū;
- a triplet's score S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij);
- the budget b(t) (total kept triplets): b(0) = Σ initial ranks for t ≤ t_i, then the cubic decrease
  b(T) + (b(0) − b(T)) (1 − (t − t_i)/(T − t_i − t_f))³ (truncated to an integer, as PEFT), and b(T) = target
  rank × modules for the last t_f steps;
- every ``deltaT`` steps of the decreasing phase, the b(0) − b(t) triplets of lowest S (over all modules at
  once) get λ_i = 0; at t = T − t_f the allocation is final and re-applied after every later step.

The orthogonality regulariser (§3.1) R = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F is added to the loss with its
coefficient γ (``orth_reg_weight``). ``orth_reg="code"`` (the default) computes it as the official code and PEFT
do: the mean over all P and Q matrices of ‖·‖_F (not squared); ``orth_reg="paper"`` is γ Σ_modules R.

State: the smoothed sensitivity and uncertainty of every entry and the current allocation (``rank_mask``) are
buffers of the layer; ``RankAllocator.state_dict`` hands them to a checkpoint so a resumed run goes on with
the same numbers. The final ranks are recorded in the model's adapter config (``allocated_ranks``).

``allocate="adalora"`` on DoRA (``AdaDoRA``) is this project's combination, not a paper's: DoRA's directional
update (arXiv 2402.09353 Eq. 5) in AdaLoRA's P Λ Q form with the same importance, budget and regulariser over
the triplets; the magnitude m is a per-row vector with no rank, so it trains as in DoRA outside the budget.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank.adapters import dora as dora_module
from lowrank.adapters.base import AdaptedLayer, check_rank_fits, no_slices
from lowrank.adapters.dora import DoRA
from lowrank.adapters.lora import LoRA, _dropout
from lowrank.adapters.lora import read_factors as lora_read_factors

#: keyword options of the allocation and their defaults (conf/adapter/adalora.yaml says why): PEFT 0.21
#: ``AdaLoraConfig``'s, except init_r (None: 1.5 × the target rank, PEFT's 12 for 8) and the phases (PEFT: tinit=0,
#: tfinal=0, deltaT=1); tinit/tfinal are steps, or fractions (0 < x < 1) of the training steps.
ALLOCATION = {"init_r": None, "tinit": 0.1, "tfinal": 0.2, "deltaT": 10, "beta1": 0.85, "beta2": 0.85,
              "orth_reg_weight": 0.5, "orth_reg": "code"}
OPTIONS = ("dropout", *ALLOCATION)
ORTH_FORMS = ("code", "paper")
RANKNUM_EPS = 1e-5   # PEFT: scaling / (ranknum + 1e-5)
FACTORS = ("lora_Q", "lora_E", "lora_P")


def initial_rank(rank: int, init_r) -> int:
    """The number of triplets each module starts with: ``init_r``, or ⌈1.5 · rank⌉."""
    if init_r is None:
        return math.ceil(1.5 * rank)
    if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r < rank:
        raise ValueError(f"init_r={init_r!r} must be an integer >= the target rank {rank}; "
                         f"e.g. init_r={math.ceil(1.5 * rank)}")
    return init_r


class AdaLoRA(LoRA):
    """AdaLoRA's SVD-form update on one weight matrix (Linear, Conv1D, Conv2d)."""

    adapter_name = "adalora"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, *, target_rank: int | None = None,
                 dropout: float = 0.0, rslora: bool = False, init: str | None = "default"):
        if rslora:
            raise ValueError("rslora=True does not apply to AdaLoRA, whose scale is α/(r + 1e-5) as in PEFT; drop it")
        if init not in (None, "default"):
            raise ValueError(f"init={init!r} does not apply to AdaLoRA (P, Q random, Λ = 0 as in the paper); drop it")
        AdaptedLayer.__init__(self, base)
        if self.kind == "embedding":
            raise ValueError("AdaLoRA on an nn.Embedding is not supported (nor in PEFT); adapt it with 'lora'")
        self.register_buffer("lora_A0", None)  # LoRA's init-from-W factors: none here (ΔW is s·PΛQ itself)
        self.register_buffer("lora_B0", None)
        self.loralib_conv = False  # LoRA's conv_form=loralib: not an AdaLoRA form
        self.rank = rank                                     # initial rank: the number of triplets
        self.target_rank = rank if target_rank is None else target_rank
        self.alpha = float(self.target_rank if alpha is None else alpha)
        self.scaling = self.alpha / (rank + RANKNUM_EPS)
        like = base.weight
        self.lora_Q = nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32, device=like.device))
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, dtype=torch.float32, device=like.device))
        self.lora_P = nn.Parameter(torch.empty(self.out_features, rank, dtype=torch.float32, device=like.device))
        nn.init.normal_(self.lora_Q, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_P, mean=0.0, std=0.02)
        self.lora_dropout = _dropout(dropout)
        self.register_buffer("rank_mask", torch.ones(rank, dtype=torch.bool, device=like.device), persistent=False)
        for name in FACTORS:
            p = getattr(self, name)
            self.register_buffer(f"sensitivity_{name}", torch.zeros_like(p), persistent=False)
            self.register_buffer(f"uncertainty_{name}", torch.zeros_like(p), persistent=False)

    # LoRA's code reads (lora_A, lora_B) with ΔW = s · B A: B = P, A = diag(λ) Q.
    @property
    def lora_A(self) -> torch.Tensor:
        return self.lora_Q * self.lora_E

    @property
    def lora_B(self) -> torch.Tensor:
        return self.lora_P

    def allocated_rank(self) -> int:
        return int(self.rank_mask.sum())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target_rank={self.target_rank}"


class AdaDoRA(DoRA, AdaLoRA):
    """DoRA whose directional update is AdaLoRA's P Λ Q (``adapter=dora adapter.allocate=adalora``): DoRA's
    forward, norm and merge (``DoRA`` first in the MRO) read ``lora_A``/``lora_B`` from AdaLoRA's triplet."""

    adapter_name = "dora"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, *, target_rank: int | None = None,
                 dropout: float = 0.0, norm: str = "detached", fast: bool = True):
        target_rank = rank if target_rank is None else target_rank
        DoRA.__init__(self, base, rank, float(target_rank if alpha is None else alpha), dropout=dropout, norm=norm,
                      fast=fast)
        self.target_rank = target_rank


def allocation_options(options: dict) -> dict:
    """The allocation options with their defaults, each checked (one line naming the bad value)."""
    o = {**ALLOCATION, **{k: v for k, v in options.items() if k in ALLOCATION and v is not None}}
    for key in ("beta1", "beta2"):
        if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or not 0 < o[key] < 1:
            raise ValueError(f"{key}={o[key]!r} must be in (0, 1); AdaLoRA uses 0.85")
    if o["orth_reg"] not in ORTH_FORMS:
        raise ValueError(f"orth_reg={o['orth_reg']!r} is not one of {ORTH_FORMS}; use 'code' (PEFT) or 'paper'")
    if isinstance(o["orth_reg_weight"], bool) or not isinstance(o["orth_reg_weight"], (int, float)) \
            or o["orth_reg_weight"] < 0:
        raise ValueError(f"orth_reg_weight={o['orth_reg_weight']!r} must be a number >= 0; e.g. 0.5")
    if isinstance(o["deltaT"], bool) or not isinstance(o["deltaT"], int) or o["deltaT"] < 1:
        raise ValueError(f"deltaT={o['deltaT']!r} must be a positive number of steps; e.g. deltaT=10")
    for key in ("tinit", "tfinal"):
        _steps(o[key], 1, key)
    return o


# ---- the registry's constructors -----------------------------------------------------------------------

def _layer_kwargs(rank: int, options: dict) -> dict:
    return {"target_rank": rank, "dropout": options.get("dropout", 0.0)}


def build(target, rank: int, alpha: float | None, options: dict) -> AdaLoRA:
    allocation_options(options)
    no_slices("adalora", target)
    init = initial_rank(rank, options.get("init_r"))
    check_rank_fits(init, target)
    return AdaLoRA(target.module, init, alpha, **_layer_kwargs(rank, options))


def build_dora(target, rank: int, alpha: float | None, options: dict) -> DoRA:
    """DoRA, or with ``allocate="adalora"`` DoRA with AdaLoRA's update and allocation (``AdaDoRA``)."""
    allocate = options.get("allocate")
    if allocate in (None, "none"):
        return dora_module.build(target, rank, alpha, options)
    if allocate != "adalora":
        raise ValueError(f"allocate={allocate!r} is not an allocation; use allocate=adalora or leave it unset")
    for option, plain in (("init", "default"), ("rslora", False)):
        if options.get(option) not in (None, plain):
            raise ValueError(f"{option}={options[option]!r} does not apply to DoRA with allocate=adalora (AdaLoRA's "
                             f"P Λ Q update, scale α/(r + 1e-5)); drop it")
    allocation_options(options)
    no_slices("dora", target)
    init = initial_rank(rank, options.get("init_r"))
    check_rank_fits(init, target)
    return AdaDoRA(target.module, init, alpha, **_layer_kwargs(rank, options),
                   norm=options.get("dora_norm", "detached"), fast=options.get("dora_fast", True))


def read_factors(module: str, tensors: dict[str, torch.Tensor], scaling: float) -> dict[str, dict]:
    """A saved module's factors in LoRA's form: ``A`` = diag(λ) Q (r, in), ``B`` = P (out, r), plus the triplet
    itself (``P``, ``E``, ``Q``); DoRA with allocation adds ``magnitude``. A module saved without a triplet
    (plain DoRA) is read as LoRA's."""
    if f"{module}.lora_Q" not in tensors:
        return lora_read_factors(module, tensors, scaling)
    Q, E, P = (tensors[f"{module}.{n}"] for n in FACTORS)
    entry = {"A": Q * E, "B": P, "scaling": scaling, "P": P, "E": E, "Q": Q}
    if f"{module}.magnitude" in tensors:
        entry["magnitude"] = tensors[f"{module}.magnitude"]
    return {module: entry}


# ---- the allocation ------------------------------------------------------------------------------------

def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total: int,
                    delta_t: int = 1) -> tuple[int, bool]:
    """``(b(t), mask at this step?)``: §3.3's cubic schedule as PEFT 0.21 ``RankAllocator.budget_schedule``
    evaluates it (the budget truncated to an integer; masks every ``delta_t`` steps while it decreases)."""
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * remaining ** 3 + target_budget), step % delta_t == 0


def _steps(value, total: int, name: str) -> int:
    if isinstance(value, float) and 0 < value < 1:
        return int(value * total)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise ValueError(f"{name}={value!r} is neither a number of steps nor a fraction in (0, 1); e.g. {name}=0.1")
    return int(value)


class RankAllocator:
    """AdaLoRA's training hooks for one model: the regulariser, the importance update and the masking, and
    the state a checkpoint must keep. Holds no state of its own (it lives in the layers' buffers)."""

    def __init__(self, layers: dict[str, AdaLoRA], options: dict, total_steps: int | None, config: dict | None):
        self.layers, self.config = layers, config
        o = allocation_options(options)
        self.beta1, self.beta2, self.delta_t = o["beta1"], o["beta2"], o["deltaT"]
        self.orth_weight, self.orth_form = o["orth_reg_weight"], o["orth_reg"]
        self.init_budget = sum(layer.rank for layer in layers.values())
        self.target_budget = sum(layer.target_rank for layer in layers.values())
        self.total = total_steps
        if total_steps is not None and layers:
            self.tinit, self.tfinal = _steps(o["tinit"], total_steps, "tinit"), _steps(o["tfinal"], total_steps, "tfinal")
            if self.tinit >= total_steps - self.tfinal:
                raise ValueError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no step of {total_steps} to "
                                 f"allocate ranks in; lower them (AdaLoRA needs tinit < total_steps - tfinal)")
            if config is not None:  # what PEFT's format records of the schedule (total_step, tinit, tfinal)
                config["total_steps"], config["schedule_steps"] = total_steps, [self.tinit, self.tfinal]

    # ---- the loss ----------------------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor | float:
        """γ · R over every module (see the module docstring for the two forms)."""
        if not self.layers or self.orth_weight == 0:
            return 0.0
        terms = []
        device = next(iter(self.layers.values())).lora_P.device
        with torch.autocast(device.type, enabled=False):  # r×r Gram matrices of float32 factors, in float32
            for layer in self.layers.values():
                P, Q = layer.lora_P, layer.lora_Q
                for cov in (P.t() @ P, Q @ Q.t()):
                    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                    diff = torch.linalg.matrix_norm(cov - eye)
                    terms.append(diff if self.orth_form == "code" else diff.square())
            total = torch.stack(terms).sum()
        return self.orth_weight * (total / len(terms) if self.orth_form == "code" else total)

    # ---- after each optimizer step ----------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        """Ī and Ū of every entry of P, λ, Q from the current gradients (§3.2)."""
        for layer in self.layers.values():
            for name in FACTORS:
                p = getattr(layer, name)
                sensitivity = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                smooth, unc = getattr(layer, f"sensitivity_{name}"), getattr(layer, f"uncertainty_{name}")
                smooth.mul_(self.beta1).add_(sensitivity, alpha=1 - self.beta1)
                unc.mul_(self.beta2).add_((sensitivity - smooth).abs(), alpha=1 - self.beta2)

    @torch.no_grad()
    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i per module: s(λ_i) + mean over P's column i + mean over Q's row i, s = Ī · Ū."""
        def score(layer, name):
            return getattr(layer, f"sensitivity_{name}") * getattr(layer, f"uncertainty_{name}")
        return {n: score(layer, "lora_E").view(-1) + (score(layer, "lora_Q").mean(1) + score(layer, "lora_P").mean(0))
                for n, layer in self.layers.items()}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keep the triplets above the (b(0) − b)-th lowest score over all modules; λ = 0 for the others."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        if k <= 0:
            masks = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k)[0]
            masks = {n: s > threshold for n, s in scores.items()}
        for name, layer in self.layers.items():
            layer.rank_mask.copy_(masks[name])
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for layer in self.layers.values():
            layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)
        if self.config is not None:
            self.config["allocated_ranks"] = self.ranks()

    def reset_importance(self) -> None:
        for layer in self.layers.values():
            for name in FACTORS:
                getattr(layer, f"sensitivity_{name}").zero_()
                getattr(layer, f"uncertainty_{name}").zero_()

    def after_step(self, step: int) -> None:
        """PEFT's ``update_and_allocate(step)``: call after ``optimizer.step()``, before the gradients are zeroed."""
        if not self.layers:
            return
        if self.total is None:
            raise ValueError("AdaLoRA's budget schedule needs the number of training steps; pass "
                             "lowrank.training_hooks(model, total_steps=...)")
        final = self.total - self.tfinal
        if step < final:
            self.update_importance()
            budget, mask = budget_schedule(step, self.init_budget, self.target_budget, self.tinit, self.tfinal,
                                           self.total, self.delta_t)
            if mask:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.target_budget)
            self.reset_importance()
        else:
            self.apply_masks()

    # ---- what a checkpoint keeps -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.rank_mask"] = layer.rank_mask
            for factor in FACTORS:
                for kind in ("sensitivity", "uncertainty"):
                    out[f"{name}.{kind}_{factor}"] = getattr(layer, f"{kind}_{factor}")
        return out

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if set(tensors) != set(own):
            odd = sorted(set(tensors) ^ set(own))
            raise ValueError(f"the AdaLoRA state in the checkpoint does not match the model ({odd[0]!r}); it belongs "
                             f"to another configuration: delete it or use another run dir")
        for key, value in tensors.items():
            own[key].copy_(value)
        if self.config is not None:
            self.config["allocated_ranks"] = self.ranks()

    def ranks(self) -> dict[str, int]:
        """The rank each module keeps now: ``{module: k}``."""
        return {name: layer.allocated_rank() for name, layer in self.layers.items()}


def hooks(model: nn.Module, options: dict, total_steps: int | None, config: dict | None) -> RankAllocator:
    """The registry's ``hooks``: the allocator over every AdaLoRA/AdaDoRA layer of ``model``."""
    from lowrank.core import adapted_modules

    layers = {n: m for n, m in adapted_modules(model).items() if isinstance(m, AdaLoRA)}
    return RankAllocator(layers, options, total_steps, config)
