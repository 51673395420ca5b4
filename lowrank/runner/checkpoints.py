"""What a run keeps on disk while it trains: resumable checkpoints and the weight trajectory.

A checkpoint (``step-N`` under the run's ``checkpoints/``) holds the trainable tensors (safetensors), the
state an adapter's training hooks keep (``adapter_state.safetensors``: AdaLoRA's importance and rank masks), the
optimizer and scheduler state and the torch RNG (``optimizer.pt``, read back with ``weights_only=True``),
and the loop's state and Python/NumPy RNG (``state.json``); it is written to a temporary folder and
renamed, and older ones are deleted. A checkpoint that cannot be read whole (a truncated file, a disk
error) is moved aside to ``damaged-step-N`` with one warning (``usable_checkpoint``), and the run resumes
from the one before it, or from step 0. The trajectory files ``weights-step{N}.safetensors`` hold the target
modules' effective weights W0 + ΔW (float32, ``(out, in)``) and are never deleted.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowrank.atomic import atomic_path
from lowrank.io import load_into, load_tensors, save_tensors
from lowrank.runner.rundir import weights_file

log = logging.getLogger(__name__)
CHECKPOINT = re.compile(r"step-(\d+)$")


def target_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The effective weight of each named module as a float32 ``(out, in)`` matrix: W0 + ΔW for an
    adapted layer, the layer's own weight otherwise (full fine-tuning, BitFit, head)."""
    from lowrank.adapters.base import AdaptedLayer, layer_kind, weight_matrix

    out = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdaptedLayer):
            # W0 as pretrained (original_matrix: the base may hold a PiSSA-style residual) + ΔW
            w = getattr(module, "original_matrix", module.base_matrix)().detach().float() + module.delta_weight()
        else:
            w = weight_matrix(module, layer_kind(module)).detach().float()
        out[name] = w.cpu().contiguous()
    return out


def save_weights(model: nn.Module, names: list[str], folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return save_tensors(folder / weights_file(step), target_weights(model, names), {"step": str(step)})


STATE = "state.json"
ADAPTER_STATE = "adapter_state.safetensors"   # what an adapter's training hooks keep (lowrank.training_hooks)


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders ``step-N`` (not half-written temporary ones), newest first."""
    done = [p for p in folder.glob("step-*") if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(done, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint folder (``step-N``), ignoring half-written ``.tmp`` ones."""
    return next(iter(checkpoints(folder)), None)


def usable_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose files all read back whole; each one that does not is renamed
    ``damaged-step-N`` (kept for inspection, never resumed from) with one warning naming it and why."""
    for path in checkpoints(folder):
        try:
            _read(path, torch.device("cpu"))
            return path
        except Exception as e:  # noqa: BLE001 - any failure to read it back makes it unusable
            aside = path.with_name(f"damaged-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            earlier = len(checkpoints(folder))
            log.warning("checkpoint %s does not load (%s); moved aside to %s, resuming from %s", path,
                        _reason(e), aside.name,
                        "the one before it" if earlier else "step 0")
    return None


def _read(path: Path, device: torch.device) -> tuple[dict, dict, dict]:
    """A checkpoint's (tensors, optimizer blob, state), all read before any is applied."""
    tensors = load_tensors(path / "trainable.safetensors")
    blob = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    state = read_state(path)
    if not isinstance(state, dict) or "step" not in state or "rng" not in state:
        raise ValueError(f"{path / STATE} has no step or RNG state")
    return tensors, blob, state


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict) -> Path:
    """Write checkpoint ``step-N`` atomically (temporary folder, then rename) and delete the older ones."""
    from lowrank import trainable_state_dict, training_hooks

    final = folder / f"step-{state['step']}"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_tensors(tmp / "trainable.safetensors", trainable_state_dict(model))
        adapter_state = training_hooks(model).state_dict()  # AdaLoRA's importance and masks (lowrank/hooks.py)
        if adapter_state:
            save_tensors(tmp / ADAPTER_STATE, adapter_state)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "optimizer.pt")
        rng = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())}
        (tmp / STATE).write_text(json.dumps({**state, "rng": rng}, indent=1))
    for old in folder.glob("step-*"):  # keep the newest only (and drop half-written ones)
        if old != final and not old.name.startswith(f"{final.name}."):
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    """The loop's state saved in checkpoint ``path`` (step, fingerprint, metrics so far, RNG)."""
    return json.loads((path / STATE).read_text())


def load_checkpoint(path: Path, model, optimizer, scheduler, device: torch.device) -> dict:
    """Restore a ``save_checkpoint`` folder into model/optimizer/scheduler and the RNGs; return the state."""
    tensors, blob, state = _read(path, device)
    load_into(model, tensors, f"checkpoint {path}", fix="it belongs to another configuration: delete it or "
                                                         "use another run dir")
    from lowrank import training_hooks

    adapter_state = path / ADAPTER_STATE
    training_hooks(model).load_state_dict(load_tensors(adapter_state) if adapter_state.is_file() else {})
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"].cpu())
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in blob["cuda_rng"]])
    rng = state.pop("rng")
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _reason(error: Exception) -> str:
    """An exception's first clause, for a one-line warning."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split("; ")[0][:200]
