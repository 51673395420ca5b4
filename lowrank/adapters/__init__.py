"""The adapter registry: one entry per method, and everything else dispatches through it.

An entry (``AdapterSpec``) says what the method is and how to handle it everywhere:

- ``build(target, rank, alpha, options)`` wraps one target module (methods that wrap layers), or
  ``trains(parameter_name)`` picks the base parameters that train (methods that select parameters);
- ``read_factors(module, tensors, scaling)`` reads a saved module's low-rank factors back (what the
  results API and the analyses use), and ``delta_from_factors`` says ΔW = scaling · B A exactly;
- ``options`` are the keyword options ``lowrank.adapt`` accepts for it, ``default_targets`` its targets;
- ``inject(model, targets, layers, rank, options)`` acts at the model level (after any wrapping): it adds
  a module or tokens (prefixes, soft prompts; ``lowrank.adapters.injected``) or chooses what trains
  (top blocks, a norm-training switch);
- ``hooks(model, options, total_steps, config)``: what the method adds to the training loop (a loss term, a
  step after each optimizer step, checkpoint state; ``lowrank.hooks``), None for nothing;
- ``has_delta``: training changes the weight matrices of the target modules, so ΔW = W − W0 exists and
  is in general non-zero: the low-rank updates, (IA)³ (W' = diag(l)·W, ΔW = (diag(l) − I)·W, arXiv
  2205.05638 §3.3), full fine-tuning and the block-wise methods (top, gradual: the blocks' own weights
  train). It is False where those matrices stay W0: BitFit (biases), head (the task head), bottleneck
  adapters (new modules), prefixes and prompts (new tokens). The weight analyses read ΔW of exactly the
  methods where it is True.

Adding a method: a module here with its layer and ``build``, an entry below (stating ``has_delta``), ``conf/adapter/<name>.yaml``
naming its source, and a float64 reference test. It must come off again (``lowrank.remove_adapters``,
checked for every entry by tests/test_removal.py): a layer that changes its base overrides
``AdaptedLayer.release``; an injection keeps what it hooked or changed on its ``Injected`` module, whose
``remove`` gives it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lowrank.adapters import adalora, bottleneck, flora, ia3, layers, lora, mora, prefix, prompt
from lowrank.adapters.base import AdaptedLayer, layer_kind
from lowrank.adapters.dora import DoRA
from lowrank.adapters.flora import FLoRA
from lowrank.adapters.ia3 import IA3
from lowrank.adapters.lora import FusedLoRA, LoRA
from lowrank.adapters.mora import MoRA


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    label: str                       # as the papers print it (LoRA, DoRA, FT)
    summary: str                     # the update and its source
    uses_rank: bool = False
    options: tuple[str, ...] = ()
    default_targets: tuple[str, ...] = ("q", "v")   # LoRA §4.2 (arXiv 2106.09685)
    build: Callable[..., AdaptedLayer] | None = None
    trains: Callable[[str], bool] | None = None
    read_factors: Callable[[str, dict, float], dict] | None = None
    delta_from_factors: bool = False
    inject: Callable[..., object] | None = None
    hooks: Callable[..., object] | None = None
    has_delta: bool = field(kw_only=True)   # every entry states it (see above)

    @property
    def wraps(self) -> bool:
        """Wraps target modules (otherwise: a choice of trainable base parameters)."""
        return self.build is not None

    @property
    def has_factors(self) -> bool:
        return self.read_factors is not None


ADAPTERS: dict[str, AdapterSpec] = {s.name: s for s in (
    AdapterSpec("lora", "LoRA", "LoRA, Hu et al. 2021 (arXiv 2106.09685): W0 + (α/r) B A", uses_rank=True,
                options=("dropout", "rslora", "init", "conv_form"), build=lora.build, read_factors=lora.read_factors,
                delta_from_factors=True, has_delta=True),
    AdapterSpec("dora", "DoRA", "DoRA, Liu et al. 2024 (arXiv 2402.09353): m (W0 + ΔW) / ‖W0 + ΔW‖_c",
                uses_rank=True,
                options=("dropout", "rslora", "dora_norm", "dora_fast", "init", "allocate", *adalora.ALLOCATION),
                build=adalora.build_dora, read_factors=adalora.read_factors, hooks=adalora.hooks, has_delta=True),
    AdapterSpec("flora", "FLoRA", "FLoRA, Si et al. 2024 (arXiv 2405.14739): Tucker core, s · G ×1 A_in ×2 A_out "
                "(×3 ×4 for convs)", uses_rank=True, options=("dropout", "scale", "ranks"), build=flora.build,
                read_factors=flora.read_factors, delta_from_factors=True, has_delta=True),
    AdapterSpec("mora", "MoRA", "MoRA, Jiang et al. 2024 (arXiv 2405.12130): W0 + f_decomp(M f_comp(x)), one "
                "square M of LoRA-r's parameter count", uses_rank=True, options=("dropout", "mora_type"),
                build=mora.build, has_delta=True),
    AdapterSpec("adalora", "AdaLoRA", "AdaLoRA, Zhang et al. 2023 (arXiv 2303.10512): W0 + s·P Λ Q, ranks allocated "
                "by importance", uses_rank=True, options=adalora.OPTIONS, build=adalora.build,
                read_factors=adalora.read_factors, delta_from_factors=True, hooks=adalora.hooks, has_delta=True),
    AdapterSpec("ia3", "(IA)³", "(IA)³, Liu et al. 2022 (arXiv 2205.05638): learned rescaling of k, v and the "
                "FFN activation", options=("feedforward",), default_targets=("k", "v", "down"), build=ia3.build,
                has_delta=True),
    AdapterSpec("bitfit", "BitFit", "BitFit, Ben Zaken et al. 2022 (arXiv 2106.10199): train the biases only",
                trains=lambda name: name.endswith("bias"), has_delta=False),
    AdapterSpec("head", "Head", "frozen backbone, train the task head only", trains=lambda name: False,
                has_delta=False),
    AdapterSpec("full", "FT", "full fine-tuning of every weight", trains=lambda name: True, has_delta=True),
    AdapterSpec("houlsby", "AdapterH", "Houlsby et al. 2019 (arXiv 1902.00751): h + W_up f(W_down h) after the "
                "attention output and the FFN, LayerNorms trained", uses_rank=True,
                options=("nonlinearity", "init_std", "train_norms"), default_targets=("o", "down"),
                build=bottleneck.build_houlsby, inject=bottleneck.norms_trained(True), has_delta=False),
    AdapterSpec("pfeiffer", "AdapterP", "Pfeiffer et al. 2020 (arXiv 2005.00247): one bottleneck adapter after "
                "the FFN", uses_rank=True, options=("nonlinearity", "init_std", "train_norms"),
                default_targets=("down",), build=bottleneck.build_pfeiffer, inject=bottleneck.norms_trained(False),
                has_delta=False),
    AdapterSpec("prefix", "Prefix", "Prefix-Tuning, Li & Liang 2021 (arXiv 2101.00190): trained key/value "
                "prefixes at every layer through an MLP, folded after training", options=("length", "reparam",
                "hidden"), inject=prefix.inject_prefix, has_delta=False),
    AdapterSpec("ptuning2", "P-Tuning v2", "P-Tuning v2, Liu et al. 2021 (arXiv 2110.07602): trained key/value "
                "prefixes at every layer", options=("length", "reparam", "hidden"), inject=prefix.inject_ptuning2,
                has_delta=False),
    AdapterSpec("prompt", "Prompt", "Prompt Tuning, Lester et al. 2021 (arXiv 2104.08691): soft tokens in the "
                "input embeddings", options=("length", "init", "init_ids"), inject=prompt.inject_prompt,
                has_delta=False),
    AdapterSpec("ptuning", "P-Tuning", "P-Tuning, Liu et al. 2021 (arXiv 2103.10385): soft tokens from an "
                "LSTM/MLP prompt encoder", options=("length", "init", "init_ids", "encoder", "hidden"),
                inject=prompt.inject_ptuning, has_delta=False),
    AdapterSpec("top", "FT^Top2", "fine-tune the top k blocks and the head (LoRA paper Table 2, k=2)",
                options=("k",), trains=lambda name: False, inject=layers.inject_top, has_delta=True),
    AdapterSpec("gradual", "Gradual", "gradual unfreezing, Howard & Ruder 2018 (arXiv 1801.06146): one more "
                "block from the top every N steps", options=("every", "k"), trains=lambda name: False,
                inject=layers.inject_gradual, has_delta=True),
)}


def spec(name: str) -> AdapterSpec:
    """The registry entry of ``name``; an unknown name is one line listing the known ones."""
    found = ADAPTERS.get(name)
    if found is None:
        raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(ADAPTERS)}")
    return found


__all__ = ["ADAPTERS", "AdapterSpec", "AdaptedLayer", "LoRA", "FusedLoRA", "DoRA", "FLoRA", "IA3", "MoRA", "layer_kind",
           "spec"]
