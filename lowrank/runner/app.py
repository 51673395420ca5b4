"""One Hydra job = one run: the only place where the Hydra config is translated into library calls.

``run(cfg)`` checks the config (``check``, unless the command line did), takes the run dir's lock, skips
the job if its run dir already holds a completed result of the same configuration whose vouched files are
whole, reads and checks the task data, loads the model (``lowrank.runner.models``), tokenises the data
(``lowrank.runner.data``), calls ``lowrank.adapt``, trains (``lowrank.runner.train.fit``,
which resumes from the run dir's last checkpoint), saves the adapter, mirrors to W&B
(``lowrank.runner.tracking``) and finally writes ``result.json`` atomically. A training failure (non-finite loss,
any error after the config checks) gives ``status: failed`` with the error; a configuration error raises
``ConfigError`` (one line) before anything is written.

The command line around it (validating every job of a sweep first, exit codes) is ``command.py``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import resource
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lowrank.runner.config import ConfigError, as_typed, first_line, validate
from lowrank.runner.rundir import (ADAPTER, CHECKPOINTS, BrokenResult, counted, end_attempt, owned, read_result,
                                   start_attempt, vouched_damage, vouched_files, write_result)

log = logging.getLogger(__name__)
# Keys that say where/how a run is stored or shown, not what it computes (left out of the fingerprint).
NOT_IDENTITY = ("paths", "logger", "name")


# ---- config -> library ---------------------------------------------------------------------------------

def adapt_kwargs(cfg: DictConfig) -> dict:
    """The ``lowrank.adapt`` call for ``cfg``: adapter name, targets, rank, alpha, layers, options."""
    options = {k: v for k, v in OmegaConf.to_container(cfg.adapter.options, resolve=True).items() if v is not None}
    return {"adapter": cfg.adapter.name, "targets": [str(t) for t in cfg.targets], "rank": int(cfg.rank),
            "alpha": None if cfg.alpha is None else float(cfg.alpha),
            "layers": None if cfg.layers is None else [int(i) for i in cfg.layers], **options}


def identity(config: DictConfig | dict) -> dict:
    """The part of a (resolved) config that determines a run's numbers: not where it is stored or logged."""
    ident = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    if isinstance(config, DictConfig):
        ident = OmegaConf.to_container(OmegaConf.create(ident), resolve=True)
    ident["trainer"] = {k: v for k, v in ident.get("trainer", {}).items() if k != "progress"}
    return ident


def fingerprint(cfg: DictConfig | dict) -> str:
    """A short hash of ``identity(cfg)``."""
    return hashlib.sha1(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (for messages)."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def check_targets(cfg: DictConfig, model_config) -> None:
    """Adapt the model's weightless skeleton (meta device) so that a target the model lacks, a rank too
    large for a layer, or an option the adapter rejects fails before any weights are loaded."""
    import lowrank
    from lowrank.runner import models

    skeleton = models.skeleton(cfg.model, cfg.task, model_config)
    if cfg.layers is not None:
        from lowrank.targeting import layer_index

        indices = {layer_index(name) for name, _ in skeleton.named_modules()} - {None}
        outside = [i for i in cfg.layers if i not in indices]
        if outside and indices:
            last = max(indices)
            raise ConfigError(f"layers={list(cfg.layers)}: model {cfg.model.name} has layers 0..{last} ({last + 1} "
                              f"layers), so {outside[0]} is out of range; fix: choose layers in 0..{last}, e.g. "
                              f"layers=[0,{last}], or layers=null for all")
    try:
        kwargs = adapt_kwargs(cfg)
        lowrank.adapt(skeleton, kwargs.pop("adapter"), **kwargs)
        lowrank.remove_adapters(skeleton)  # it shares model_config, whose values a method may change (prefix)
    except ValueError as e:
        message = str(e) if "fix:" in str(e) or "; " not in str(e) else str(e).replace("; ", "; fix: ", 1)
        raise ConfigError(f"model={cfg.model.name} adapter={cfg.adapter.name}: {message}") from None


def hydra_job() -> dict:
    """This job's overrides and name from Hydra (empty outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return {"overrides": list(hc.overrides.task), "name": hc.job.override_dirname or "default",
                "num": hc.job.get("num", 0)}
    except Exception:  # noqa: BLE001 - called outside a Hydra app (tests, notebooks)
        return {"overrides": [], "name": "default", "num": 0}


def _peak_memory() -> dict:
    import torch

    out = {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _rss_mb() -> float | None:
    from lowrank.runner.costs import rss

    try:
        return round(rss()[0] / 2**20, 1)
    except (OSError, KeyError):
        return None


def _predicted_costs(model, cfg, device, autocast: bool) -> dict | None:
    """``lowrank.runner.costs.predict`` for this run's micro-batch at ``max_seq_len`` (an upper bound: batches
    are padded to their longest sequence); None where the model's shape is not known to the cost model."""
    from lowrank.runner import costs

    t = cfg.trainer
    try:
        return costs.predict(model, batch=t.batch_size // t.grad_accum, seq=t.max_seq_len, autocast=autocast,
                             kind=cfg.task.kind, device=str(device)).to_dict()
    except (AttributeError, TypeError, ValueError) as e:
        log.warning("no cost prediction (%s)", first_line(e))
        return None


@functools.lru_cache(maxsize=1)
def _process_start() -> float | None:
    """When this process started (a time.time(); Linux: /proc), else None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _since_process_start(when: float | None) -> float | None:
    """Seconds from this process's start to ``when`` (a time.time()), else None."""
    start = _process_start()
    return None if when is None or start is None else round(when - start, 2)


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|datasets)\..*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "datasets", "huggingface_hub", "urllib3", "filelock", "torchao",
                 "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---- one run ----------------------------------------------------------------------------------------------

def check(cfg: DictConfig, seen: set[str] | None = None) -> DictConfig:
    """The whole configuration check of one job: ``validate`` (values, names, files), then
    ``check_targets`` (targets, rank, alpha and options on the model's skeleton); the typed config.
    ``seen``: keys of the model/adapter combinations already checked on a skeleton (a sweep's preflight
    checks each once); updated in place."""
    from lowrank.runner import accel, models

    cfg = validate(cfg)
    packing = cfg.trainer.max_seq_len if cfg.trainer.packing else None
    key = json.dumps([OmegaConf.to_container(OmegaConf.masked_copy(
        cfg, ["model", "task", "adapter", "targets", "layers", "rank", "alpha"]), resolve=True), packing],
        sort_keys=True)
    if seen is None or key not in seen:
        model_config = models.load_config(cfg.model, cfg.task)
        if packing:
            accel.refuse_packing(model_config, packing)
        check_targets(cfg, model_config)
        if seen is not None:
            seen.add(key)
    return cfg


def run(cfg: DictConfig, *, checked: bool = False) -> dict:
    """Run (or skip, or resume) the job ``cfg`` in ``cfg.paths.output_dir``; return its result dict.

    ``checked``: the command line has already run ``check`` on this job (``command.preflight``), so the
    config is only typed here; otherwise it is checked first. The process holds the run directory's lock
    (``rundir.owned``) throughout; ``RunDirBusy`` if another process holds it. A data error
    (``data.DataError``) is written as the run's failed result and raised.
    """
    from lowrank.runner import distributed

    quiet_libraries()
    cfg = as_typed(cfg) if checked else check(cfg)
    world = distributed.current()  # torchrun: one process per GPU; only rank 0 owns the run dir and writes
    if not world.is_main:
        return _run(cfg, world)
    with owned(cfg.paths.output_dir):
        return _run(cfg, world)


def _run(cfg: DictConfig, world) -> dict:
    import torch

    import lowrank
    from lowrank.runner import data as task_data
    from lowrank.runner import models, train
    from lowrank.runner.checkpoints import latest_checkpoint, read_state, usable_checkpoint
    from lowrank.runner.loss import uses_bf16
    from lowrank.runner.tracking import Tracker

    run_dir = Path(cfg.paths.output_dir)
    fp = fingerprint(cfg)
    ident = identity(cfg)
    try:
        previous = read_result(run_dir)
    except BrokenResult as e:  # not complete: run (or resume) it again, and say so
        log.warning("%s; running the job again", e)
        previous = None
    if previous is not None and previous.get("status") == "completed":
        damage = vouched_damage(run_dir, previous) if previous.get("fingerprint") == fp else None
        if damage:  # the files it vouched for changed since: not complete any more
            log.warning("%s: %s; running the job again", run_dir, damage)
        elif previous.get("fingerprint") == fp:
            log.info("%s: already completed, skipped", run_dir)
            return previous
        else:  # same job folder, but the config changed since (edited defaults, a newer lowrank)
            changed = ", ".join(config_diff(identity(previous.get("config", {})), ident)[:5])
            log.warning("%s: completed earlier with another config (%s differ); skipped: delete the folder to "
                        "run it again", run_dir, changed or "?")
            return previous
    ckpt = (usable_checkpoint if world.is_main else latest_checkpoint)(run_dir / CHECKPOINTS)
    if ckpt is not None:
        state = read_state(ckpt)
        if state.get("fingerprint") != fp:
            changed = ", ".join(config_diff(state.get("identity", {}), ident)[:5]) or "unknown keys"
            raise ConfigError(f"run dir {run_dir} holds a checkpoint of another config ({changed} differ), which "
                              f"cannot be resumed; fix: delete {ckpt.parent} or choose another hydra.run.dir / "
                              f"hydra.sweep.dir")
    job = hydra_job()
    try:  # the data are checked before any model loads
        raw = task_data.raw_columns(cfg.task, cfg.paths.data_dir)
    except task_data.DataError as e:
        if world.is_main:
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_result(run_dir, {"status": "failed", "error": str(e), "failed_step": None,
                                   "metric": f"eval/{cfg.task.metric}", "final": None, "best": None,
                                   "config": OmegaConf.to_container(cfg, resolve=True), "overrides": job["overrides"],
                                   "job": job["name"], "fingerprint": fp, "started_at": now, "finished_at": now})
        raise

    started = time.time()
    rss_at_start = _rss_mb()
    startup = {"job_started": _since_process_start(started)}  # seconds from process start, per phase
    model_config = models.load_config(cfg.model, cfg.task)
    startup["config_checked"] = _since_process_start(time.time())
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    train.seed_everything(cfg.seed)
    device = world.device(cfg.trainer.device, job["num"])
    bf16 = uses_bf16(device, cfg.trainer.precision)
    dtype = models.weight_dtype(cfg.model.dtype, device, bf16)
    model, tokenizer = models.load(cfg.model, cfg.task, model_config, dtype=dtype, device=device)
    kwargs = adapt_kwargs(cfg)
    lowrank.adapt(model, kwargs.pop("adapter"), **kwargs)
    startup["model_loaded"] = _since_process_start(time.time())
    trainable, total = lowrank.count_parameters(model)
    predicted = _predicted_costs(model, cfg, device, bf16)
    data = task_data.load(cfg.task, tokenizer, data_dir=cfg.paths.data_dir, max_seq_len=cfg.trainer.max_seq_len,
                          max_eval_samples=cfg.trainer.max_eval_samples, raw=raw)
    startup["data_loaded"] = _since_process_start(time.time())
    resolved = OmegaConf.to_container(cfg, resolve=True)
    fit_job = train.FitJob(model, data, cfg.task, cfg.trainer, out_dir=run_dir, seed=cfg.seed,
                           weight_names=weight_modules(model, cfg), fingerprint=fp, identity=ident, world=world,
                           job_num=job["num"])
    if not world.is_main:  # a rank > 0 of a torchrun launch: trains its shards in step with rank 0, writes nothing
        return {"status": "completed", "rank": world.rank, "steps": train.fit(fit_job).steps}
    run_dir.mkdir(parents=True, exist_ok=True)
    attempts = start_attempt(run_dir, started, resumed=ckpt is not None)
    tracker = Tracker(cfg.logger, run_dir, config=resolved, name=job["name"], group=cfg.name)

    result = {"status": "failed", "error": None, "failed_step": None, "metric": f"eval/{cfg.task.metric}",
              "final": None, "best": None, "config": resolved, "overrides": job["overrides"], "job": job["name"],
              "fingerprint": fp, "trainable_params": trainable, "total_params": total,
              "trainable_fraction": trainable / total, "steps": None, "resumed_from_step": None,
              "predicted_costs": predicted, "rss_at_start_mb": rss_at_start,
              "quantization": getattr(model, "lowrank_quantization", None),
              "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds")}
    try:
        fit_job.tracker = tracker
        fit = train.fit(fit_job)
        scaling = {name: layer.scaling for name, layer in lowrank.adapted_modules(model).items()
                   if hasattr(layer, "scaling")}
        lowrank.fold(model)  # a reparameterisation (prefix MLP, prompt encoder) is saved as its values
        lowrank.save_adapter(model, run_dir / ADAPTER, extra={"scaling": scaling})
        result["files"] = vouched_files(run_dir)  # what a later skip checks before trusting this run
        first_step = _since_process_start(fit.first_step_at)
        if "allocated_ranks" in lowrank.adapter_config(model):  # AdaLoRA's final rank per module
            result["allocated_ranks"] = lowrank.adapter_config(model)["allocated_ranks"]
        result.update(status="completed", final=fit.final, best=fit.best, steps=fit.steps,
                      resumed_from_step=fit.resumed_from, train_time_s=round(fit.wall_time_s, 2),
                      step_time_s=fit.step_time_s, fast_path=fit.fast_path,
                      first_step_s=first_step, startup_s={**startup, "first_step": first_step})
    except train.TrainingFailed as e:
        result.update(error=str(e), failed_step=e.step)
    except Exception as e:  # noqa: BLE001 - any other failure is recorded, and the sweep goes on
        result.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        traceback.print_exc()
    ended = time.time()
    # wall time over every attempt of a resumed run (train_time_s counts training time the same way)
    result.update(wall_time_s=round(end_attempt(run_dir, attempts, ended), 2), attempts=len(counted(attempts)),
                  attempt_wall_time_s=round(ended - started, 2), **_peak_memory(),
                  finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tracker.summary({"status": result["status"], "wall_time_s": result["wall_time_s"],
                     "trainable_params": trainable, "total_params": total,
                     **{f"final/{k}": v for k, v in (result["final"] or {}).items()},
                     **{f"best/{k}": v for k, v in (result["best"] or {}).items()}})
    if result["status"] == "completed":
        tracker.log_artifact(run_dir / ADAPTER, name=f"adapter-{fp}")
    tracker.finish(failed=result["status"] != "completed")
    write_result(run_dir, result)  # last: its presence means the run dir is complete
    status = result["status"] if result["status"] == "completed" else f"FAILED ({result['error']})"
    log.info("%s: %s  %s", run_dir, status, _summary_line(result))
    return result


def weight_modules(model, cfg) -> list[str]:
    """Modules whose weights form the trajectory: the adapted ones, else (full/bitfit/head) the targets;
    none for methods without a ΔW of a weight matrix (prefixes, prompts, bottleneck adapters)."""
    import lowrank
    from lowrank.adapters import spec
    from lowrank.targeting import resolve

    if not spec(lowrank.adapter_config(model)["adapter"]).has_delta:
        return []
    adapted = list(lowrank.adapted_modules(model))
    trainer = cfg.trainer
    if adapted or not (trainer.save_weights_at or trainer.save_weights_every or trainer.save_weights_at_fractions):
        return adapted
    return [t.name for t in resolve(model, list(cfg.targets), None if cfg.layers is None else list(cfg.layers))]


def _summary_line(result: dict) -> str:
    final = result.get("final") or {}
    metric = result["metric"]
    if metric in final:
        best = (result.get("best") or {}).get(metric)
        return f"{metric}={final[metric]:.4f} (best {best:.4f})  wall {result['wall_time_s']:.0f}s"
    return f"wall {result['wall_time_s']:.0f}s"
