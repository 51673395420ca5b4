"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) as analysis inputs.

A folder is read through the library (``lowrank.load_peft`` on a fresh copy of its base model), so that a
PEFT LoRA/DoRA adapter, e.g. one from the Hugging Face hub, answers the same questions as a run directory:
its factors, its ΔW and the base weights W0 of the modules it adapts. The base model is the one named in
``adapter_config.json`` (``base_model_name_or_path``) unless ``--base-model`` gives another (a local folder).
"""

from __future__ import annotations

from pathlib import Path

from lowrank.io import load_tensors, read_json
from lowrank.peft_format import PEFT_CONFIG, PEFT_WEIGHTS
from lowrank.runner.results import RESULT

__all__ = ["PEFT_CONFIG", "is_peft_dir", "PeftRun"]


def is_peft_dir(path: Path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file() and not (Path(path) / RESULT).is_file()


def _model_class(task_type: str | None):
    import transformers

    return {"SEQ_CLS": transformers.AutoModelForSequenceClassification,
            "CAUSAL_LM": transformers.AutoModelForCausalLM}.get(task_type or "", transformers.AutoModel)


class PeftRun:
    """What the analyses read from a run (``lowrank.runner.results.Run``), for a PEFT adapter folder."""

    def __init__(self, path, base_model: str | None = None):
        self.dir = Path(path)
        self.peft_config = read_json(self.dir / PEFT_CONFIG)
        self.base = base_model or self.peft_config.get("base_model_name_or_path")
        if not self.base:
            raise ValueError(f"{self.dir}/{PEFT_CONFIG} names no base_model_name_or_path; pass --base-model <dir>")
        c = self.peft_config
        self.config = {"adapter": {"name": "dora" if c.get("use_dora") else "lora"}, "rank": c.get("r"),
                       "alpha": c.get("lora_alpha"), "seed": None, "targets": c.get("target_modules"),
                       "model": {"name": str(self.base)}}
        self.result = {"status": "completed"}
        self._model = None

    def _adapted(self):
        """The base model with the adapter loaded (once): the adapted modules hold A, B, m and W0."""
        if self._model is None:
            import lowrank

            kwargs = {}
            if self.peft_config.get("task_type") == "SEQ_CLS":
                tensors = load_tensors(self.dir / PEFT_WEIGHTS)
                head = [v for k, v in tensors.items() if k.endswith(("classifier.weight", "score.weight",
                                                                     "classifier.out_proj.weight"))]
                if head:
                    kwargs["num_labels"] = head[0].shape[0]
            model = _model_class(self.peft_config.get("task_type")).from_pretrained(self.base, **kwargs)
            self._model = lowrank.load_peft(model.float(), self.dir)
        return self._model

    def _layers(self):
        import lowrank

        return lowrank.adapted_modules(self._adapted())

    def factors(self) -> dict:
        import torch

        out = {}
        with torch.no_grad():
            for name, layer in self._layers().items():
                entry = {"A": layer.lora_A.detach().float().clone(), "B": layer.lora_B.detach().float().clone(),
                         "scaling": float(layer.scaling)}
                if hasattr(layer, "magnitude"):
                    entry["magnitude"] = layer.magnitude.detach().float().clone()
                out[name] = entry
        return out

    def deltas(self, step: int | None = None) -> dict:
        import torch

        if step is not None:
            raise KeyError(f"{self.dir} is a PEFT adapter folder: it holds the final update only, no steps")
        with torch.no_grad():
            return {name: layer.delta_weight().detach().float() for name, layer in self._layers().items()}

    def base_weights(self) -> dict:
        from lowrank.adapters.base import weight_matrix

        return {name: weight_matrix(layer.base, layer.kind).detach().float().clone()
                for name, layer in self._layers().items()}

    def weight_files(self) -> dict:
        return {}

    def weight_trajectory(self) -> dict:
        return {}
