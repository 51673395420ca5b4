"""Adapters on disk in lowrank's own format (safetensors + JSON, never pickle), and safe loading.

lowrank format (a directory):
    adapter.safetensors    every trainable tensor, keyed by its qualified parameter name
    adapter_config.json    ``adapter_config(model)``: adapter, targets, rank, alpha, layers, options,
                           train_modules, the wrapped module names, and ``format``

PEFT's format lives in ``lowrank.peft_format`` (``save_peft``/``load_peft``) and shares the rules here:
files are written to a temporary name and renamed, so a reader never sees half an adapter; a load
checks every name and shape before it copies anything, and a load that fails for any reason leaves the
model exactly as it was (``loading``), with one line naming the module and the fix.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank.atomic import atomic_path, write_json
from lowrank.adapters.lora import initial_factors
from lowrank.core import (CONFIG_ATTR, _refuse_adapted, adapt, adapted_modules, adapter_config, remove_adapters,
                          trainable_state_dict)

FORMAT = "lowrank-adapter/1"
WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """A safetensors file, written atomically (tensors moved to the CPU, made contiguous)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a pickle file is refused unread, a damaged file is one line naming it."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{str(path)!r} is a pickle file, which lowrank never unpickles (it can run code); "
                         f"convert it to safetensors where you trust it, e.g. PEFT's save_pretrained(..., "
                         f"safe_serialization=True)")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; point at a complete adapter directory")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({str(error).splitlines()[0]}); it is "
                         f"truncated or damaged: copy it again from its source or re-run the job that wrote it") from None


def weights_file(folder: Path, name: str) -> Path:
    """``folder/name``, refusing a folder that holds only a pickle version of the weights."""
    if not (folder / name).is_file():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            load_tensors(folder / pickles[0])  # raises the refusal line
    return folder / name


def save_adapter(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the adapter (every trainable tensor) and its config to directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**adapter_config(model), "format": FORMAT, **(extra or {})}
    tensors = {**trainable_state_dict(model), **initial_factors(adapted_modules(model))}  # + A0, B0 of an init from W
    save_tensors(path / WEIGHTS, tensors, {"format": FORMAT})
    write_json(path / CONFIG, config, sort_keys=True)
    return path


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}); it is truncated or damaged: copy it again "
                         f"from its source") from None


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a saved lowrank adapter, without a model."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"no {CONFIG} in {str(path)!r}; point at a directory written by lowrank.save_adapter")
    config = read_json(path / CONFIG)
    if config.get("format") != FORMAT:
        found = "PEFT's format" if "peft_type" in config else f"format {config.get('format')!r}"
        raise ValueError(f"{str(path)!r} holds {found}, not {FORMAT!r}; for PEFT adapters use lowrank.load_peft")
    return config, load_tensors(weights_file(path, WEIGHTS))


@contextmanager
def loading(model: nn.Module):
    """Adapt-and-load as one step: if anything inside fails, the adapter comes off again
    (``lowrank.remove_adapters``: base layers, hooks, config values and ``requires_grad`` flags as they were),
    so the model is exactly as it was (a load only copies weights after every check has passed)."""
    _refuse_adapted(model, "a load")
    try:
        yield model
    except BaseException:
        if getattr(model, CONFIG_ATTR, None) is not None:
            remove_adapters(model)  # an init from W (PiSSA...) puts W0 back: LoRA.release
        raise


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: str,
              fix: str = "load it into the base model it was trained on", complete: bool = False) -> None:
    """Copy saved tensors into the model's parameters of the same names. Every name and shape is
    checked before anything is copied; ``complete``: every trainable parameter must be in ``tensors``."""
    params = dict(model.named_parameters())
    extra = sorted(set(tensors) - set(params))
    if extra:
        raise ValueError(f"{source!r} holds {extra[0]!r} ({len(extra)} tensor(s) in all) which the model lacks: "
                         f"the adapter has more layers or other modules than this model; {fix}")
    if complete:
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
        if missing:
            raise ValueError(f"{source!r} has no weights for {missing[0]!r} ({len(missing)} in all), which this "
                             f"model adapts: the model has more layers or modules than the adapter; {fix}")
    for name, value in tensors.items():
        if params[name].shape != value.shape:
            raise ValueError(f"{name}: saved shape {tuple(value.shape)} != model shape {tuple(params[name].shape)} "
                             f"in {source!r}: the model's width differs from the adapter's; {fix}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Adapt a fresh base ``model`` as the saved adapter was, and load its weights; on any mismatch the
    model is left as it was."""
    config, tensors = read_adapter(path)
    with loading(model):
        adapt(model, config["adapter"], targets=config["targets"], rank=config["rank"], alpha=config["alpha"],
              layers=config["layers"], train_modules=config["train_modules"],
              rank_pattern=config.get("rank_pattern"), alpha_pattern=config.get("alpha_pattern"), **config["options"])
        wrapped = adapter_config(model)["modules"]
        saved = config.get("modules", wrapped)
        for ours, theirs, what in ((wrapped, saved, "adapts"), (saved, wrapped, "holds")):
            known = set(theirs)
            odd = [m for m in ours if m not in known]
            if odd:
                where = "this model" if what == "adapts" else f"the adapter {str(path)!r}"
                other = f"the adapter {str(path)!r}" if what == "adapts" else "this model"
                raise ValueError(f"{where} {what} {odd[0]!r} ({len(odd)} module(s) in all) that {other} lacks: "
                                 f"different layers; load it into the base model it was trained on")
        layers = adapted_modules(model)
        for key in [k for k in tensors if k.endswith((".lora_A0", ".lora_B0"))]:  # an init from W: A0, B0
            module, _, buffer = key.rpartition(".")
            if getattr(layers.get(module), buffer, None) is None or layers[module].get_buffer(buffer).shape != \
                    tensors[key].shape:
                raise ValueError(f"{str(path)!r} holds {key!r}, which this model's layer does not match: the "
                                 f"adapter was initialised differently; load it into the base model it was trained on")
            layers[module].get_buffer(buffer).copy_(tensors.pop(key))
        load_into(model, tensors, str(path), complete=True)
    return model

