"""lowrank: low-rank adaptation (LoRA, DoRA, FLoRA and baselines) of pretrained transformers.

The public API is small and framework-free (no Hydra, W&B or datasets import here):

    model = lowrank.adapt(model, "lora", targets=["q", "v"], rank=8, alpha=16)
    for name, layer in lowrank.adapted_modules(model).items():
        layer.delta_weight()            # ΔW, float32, (out_features, in_features)
    lowrank.save_adapter(model, "run/adapter")   # safetensors + JSON config
    lowrank.save_peft(model, "run/peft")         # PEFT's on-disk format (LoRA, DoRA)
    lowrank.remove_adapters(model)               # the base model again (PEFT's unload; or merge_and_unload)

Everything experiment-shaped (Hydra app, data, training loop, results) lives in submodules that are
imported on demand: ``lowrank.runner.app``, ``lowrank.runner.train``, ``lowrank.runner.data``, ``lowrank.runner.models``,
``lowrank.runner.results``.
"""

from lowrank.adapters import ADAPTERS, AdaptedLayer
from lowrank.core import (
    adapt,
    adapted_modules,
    adapter_config,
    count_parameters,
    fold,
    merge_adapters,
    merge_and_unload,
    remove_adapters,
    trainable_state_dict,
    unload,
    unmerge_adapters,
)
from lowrank.hooks import training_hooks
from lowrank.io import load_adapter, read_adapter, save_adapter
from lowrank.peft_format import load_peft, save_peft

__all__ = [
    "ADAPTERS",
    "AdaptedLayer",
    "adapt",
    "adapted_modules",
    "adapter_config",
    "count_parameters",
    "fold",
    "merge_adapters",
    "merge_and_unload",
    "remove_adapters",
    "unload",
    "unmerge_adapters",
    "trainable_state_dict",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "save_peft",
    "load_peft",
    "training_hooks",
]
__version__ = "0.3.0"
