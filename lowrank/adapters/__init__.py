"""The adapter registry: one small module per method, dispatched by name.

``ADAPTERS`` maps each name to what it is; ``lowrank.adapt`` reads it. Adding an adapter means a new
module here with an ``AdaptedLayer`` subclass and an entry below (see README, "Adding an adapter").
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank.adapters.base import AdaptedLayer, layer_kind
from lowrank.adapters.dora import DoRA
from lowrank.adapters.flora import FLoRA
from lowrank.adapters.ia3 import IA3
from lowrank.adapters.lora import FusedLoRA, LoRA


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    summary: str
    wraps: bool            # wraps target modules (otherwise: a choice of trainable base parameters)
    uses_rank: bool
    options: tuple[str, ...] = ()


ADAPTERS: dict[str, AdapterSpec] = {s.name: s for s in (
    AdapterSpec("lora", "LoRA, Hu et al. 2021: W0 + (α/r) B A", True, True, ("dropout", "rslora")),
    AdapterSpec("dora", "DoRA, Liu et al. 2024: m (W0 + ΔW) / ‖W0 + ΔW‖_c", True, True,
                ("dropout", "rslora", "dora_norm", "dora_fast")),
    AdapterSpec("flora", "FLoRA, Si et al. 2024: Tucker core, s · G ×1 A_in ×2 A_out (×3 ×4 for convs)", True, True,
                ("dropout", "scale", "ranks")),
    AdapterSpec("ia3", "(IA)3, Liu et al. 2022: learned rescaling of k, v and the FFN activation", True, False,
                ("feedforward",)),
    AdapterSpec("bitfit", "BitFit, Ben Zaken et al. 2022: train the biases only", False, False),
    AdapterSpec("head", "frozen backbone, train the task head only", False, False),
    AdapterSpec("full", "full fine-tuning of every weight", False, False),
)}

__all__ = ["ADAPTERS", "AdapterSpec", "AdaptedLayer", "LoRA", "FusedLoRA", "DoRA", "FLoRA", "IA3", "layer_kind"]
