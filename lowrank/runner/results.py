"""Reading what runs wrote — the only module notebooks and ``analysis/`` need (a stable API).

A run dir (one Hydra job) holds ``result.json`` (status, final/best metrics, resolved config, parameter
counts, wall time, peak memory; written last), ``metrics.jsonl``, ``adapter/`` (``lowrank.save_adapter``)
and ``checkpoints/`` (the last resume checkpoint and ``weights-step{N}.safetensors`` trajectory files).
A sweep dir holds one run dir per job and ``aggregate.csv`` / ``aggregate.parquet``.

    run = load_run("multirun/2025-01-01/12-00-00/adapter=lora,rank=8")
    run.status, run.result["final"]["eval/accuracy"], run.metrics          # DataFrame of metrics.jsonl
    run.factors()["bert.encoder.layer.0.attention.self.query"]["A"]        # (r, in), from the adapter file
    run.deltas()                                                           # {module: ΔW (out, in) float32}
    run.base_weights()                                                     # {module: W0}, loads the base model
    run.weight_trajectory()                                                # {step: {module: W0 + ΔW}}
    load_sweep("multirun/2025-01-01/12-00-00")                             # one row per run
    rows(["multirun/a", "multirun/b"])                                       # the same rows as dicts

Command line: ``python -m lowrank.runner.results aggregate <sweep_dir>`` rebuilds the sweep's table (Hydra does
it at the end of every multirun through ``AggregateCallback``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

log = logging.getLogger(__name__)

from lowrank.io import CONFIG, load_tensors, read_json
from lowrank.runner.config import GROUPS
from lowrank.runner.rundir import (ADAPTER, AGGREGATE, CHECKPOINTS, GENERATIONS, HYDRA_CONFIG, METRICS, RESULT,
                                   WEIGHTS_FILE, BrokenResult, read_result, run_dirs, weights_file)

__all__ = ["Run", "load_run", "run_dirs", "run_row", "rows", "load_sweep", "aggregate", "RESULT", "CONFIG_COLUMNS",
           "RESULT_COLUMNS", "AggregateCallback"]

# pandas (half a second to import) is imported where a table is built: Hydra's AggregateCallback brings
# this module into every run.py process and every parallel job, which never build one.
if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Run:
    """One run directory. ``config`` is the resolved config (dict); ``result`` is result.json (or
    ``{"status": "incomplete"}`` for a job that has not finished)."""

    dir: Path
    config: dict
    result: dict
    overrides: list[str] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- what result.json and metrics.jsonl say ----------------------------------------------------------
    @property
    def status(self) -> str:
        """``completed``, ``failed``, ``incomplete`` (no result.json: running or interrupted) or ``broken``
        (a result.json that cannot be read: the job reruns when its sweep is launched again)."""
        return self.result.get("status", "incomplete")

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """metrics.jsonl as a DataFrame: one row per logged step (``step``, ``train/loss``, ``eval/...``)."""
        import pandas as pd

        path = self.dir / METRICS
        if not path.is_file():
            return pd.DataFrame(columns=["step"])
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return pd.DataFrame(rows)

    @property
    def adapter_config(self) -> dict:
        """adapter/adapter_config.json: adapter, targets, rank, alpha, layers, options, modules, scaling."""
        return read_json(self.dir / ADAPTER / CONFIG)

    # ---- the learned update ----------------------------------------------------------------------------
    def factors(self) -> dict[str, dict[str, torch.Tensor | float]]:
        """Low-rank factors per adapted module, read from the adapter file (no model is loaded).

        LoRA/DoRA: ``{"A": (r, in), "B": (out, r), "scaling": α/r}`` (DoRA adds ``"magnitude"`` (out,)), so
        that ΔW = scaling · B @ A for LoRA. A fused projection adapted in slices (GPT-2 ``c_attn``) gives one
        entry per slice, keyed ``"<module>[q]"``. FLoRA: ``A_in`` (in, r1), ``core`` (r1, r2), ``A_out``
        (out, r2) and, in the same form, ``B = A_out`` and ``A = coreᵀ A_inᵀ`` (r2, in). Adapters without
        factors ((IA)³, BitFit, head, full) give ``{}``.
        """
        from lowrank import read_adapter
        from lowrank.adapters import spec

        config, tensors = read_adapter(self.dir / ADAPTER)
        reader = spec(config["adapter"]).read_factors
        if reader is None:
            return {}
        scaling = config.get("scaling", {})
        out: dict[str, dict] = {}
        for module in config.get("modules", []):
            out.update(reader(module, tensors, scaling.get(module, _default_scaling(config))))
        return out

    def deltas(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """ΔW per target module as float32 ``(out, in)`` matrices.

        ``step=None``: the final update from the adapter file — from the factors alone for LoRA and linear
        FLoRA, otherwise by rebuilding the adapted model (loads the base model). ``step=N``: from the weight
        trajectory, ``W_N − W0`` (needs ``trainer.save_weights_at`` to have included N).
        """
        if step is not None:
            files = self.weight_files()
            if step not in files:
                raise KeyError(f"no weights saved at step {step} in {self.dir / CHECKPOINTS}; steps: "
                               f"{sorted(files)}")
            base = self.base_weights()
            return {name: w - base[name] for name, w in load_tensors(files[step]).items()}
        from lowrank.adapters import ADAPTERS, spec

        config = self.adapter_config
        method = spec(config["adapter"])
        if not method.has_delta:
            with_delta = ", ".join(n for n, s in ADAPTERS.items() if s.has_delta)
            raise ValueError(f"adapter {config['adapter']!r} ({method.label}) leaves the target weights unchanged "
                             f"(ΔW = 0); weight analyses need runs of a method with ΔW ({with_delta})")
        if method.delta_from_factors and config.get("options", {}).get("conv_form") != "loralib":
            f = self.factors()  # (loralib's ConvLoRA factors are not (out, r)·(r, in): rebuilt below)
            if set(f) == set(config.get("modules", [])):  # no fused slices: ΔW = s·B·A for each
                return {name: (e["scaling"] * (e["B"].double() @ e["A"].double())).float() for name, e in f.items()}
        if not method.wraps:  # trained base weights (full fine-tuning): ΔW = W − W0
            from lowrank.adapters.base import as_matrix, layer_kind

            _, tensors = _read_adapter(self.dir)
            base, model = self.base_weights(), _base_model(self.config)
            return {name: as_matrix(tensors[f"{name}.weight"].float(), layer_kind(model.get_submodule(name))) - w0
                    for name, w0 in base.items() if f"{name}.weight" in tensors}
        import lowrank

        model = self._adapted_model()
        return {name: layer.delta_weight() for name, layer in lowrank.adapted_modules(model).items()}

    def base_weights(self) -> dict[str, torch.Tensor]:
        """W0 of the target modules (float32 ``(out, in)``), from the base model named in the run's config
        (loaded once per process and cached)."""
        if "base" not in self._cache:
            from lowrank.adapters.base import layer_kind, weight_matrix

            model = _base_model(self.config)
            names = self._module_names(model)
            self._cache["base"] = {n: weight_matrix(m := model.get_submodule(n), layer_kind(m)).detach().float().clone()
                                   for n in names}
        return self._cache["base"]

    def weight_files(self) -> dict[int, Path]:
        """``{step: path}`` of the saved weights ``checkpoints/weights-step{N}.safetensors`` (not loaded)."""
        return {int(m.group(1)): p for p in (self.dir / CHECKPOINTS).glob(weights_file("*"))
                if (m := WEIGHTS_FILE.search(p.name))}

    def weight_trajectory(self) -> dict[int, dict[str, torch.Tensor]]:
        """``{step: {module: W0 + ΔW}}`` from ``checkpoints/weights-step{N}.safetensors``, sorted by step."""
        files = self.weight_files()
        return {step: load_tensors(files[step]) for step in sorted(files)}

    def generations(self) -> pd.DataFrame:
        """generations.jsonl of a generation task (mr, prediction, references) as a DataFrame."""
        import pandas as pd

        path = self.dir / GENERATIONS
        return pd.read_json(path, lines=True) if path.is_file() else pd.DataFrame()

    # ---- helpers -----------------------------------------------------------------------------------------
    def _module_names(self, model) -> list[str]:
        names = self.adapter_config.get("modules", []) if (self.dir / ADAPTER / CONFIG).is_file() else []
        if names:
            return names
        trajectory = sorted(self.weight_files().values())
        if trajectory:
            from safetensors import safe_open

            with safe_open(str(trajectory[0]), "pt") as f:
                return list(f.keys())
        from lowrank.targeting import resolve

        return [t.name for t in resolve(model, self.config["targets"], self.config.get("layers"))]

    def _adapted_model(self):
        if "adapted" not in self._cache:
            import lowrank

            model = _load_base(self.config)
            lowrank.load_adapter(model, self.dir / ADAPTER)
            self._cache["adapted"] = model
        return self._cache["adapted"]


def _default_scaling(config: dict) -> float | None:
    from lowrank.adapters.lora import lora_scaling

    rank, alpha = config.get("rank"), config.get("alpha")
    if not rank:
        return None
    return lora_scaling(rank if alpha is None else alpha, rank, bool(config.get("options", {}).get("rslora")))


def _read_adapter(run_dir: Path):
    from lowrank import read_adapter

    return read_adapter(run_dir / ADAPTER)


def _load_base(config: dict):
    from omegaconf import OmegaConf

    from lowrank.runner import models

    cfg = OmegaConf.create(config)
    model, _ = models.load(cfg.model, cfg.task)
    return model


_BASES: dict[str, object] = {}


def _base_model(config: dict):
    """The un-adapted base model of a run, cached per (model, task kind) for a whole sweep."""
    key = json.dumps([config["model"], config["task"]["kind"], config["task"].get("num_labels")], sort_keys=True)
    if key not in _BASES:
        _BASES.clear()  # one base model in memory at a time
        _BASES[key] = _load_base(config)
    return _BASES[key]


# ---- loading -----------------------------------------------------------------------------------------

def load_run(path) -> Run:
    """Load a run dir: result.json if the run finished, else Hydra's .hydra/config.yaml (incomplete)."""
    path = Path(path)
    try:
        result = read_result(path)
    except BrokenResult as e:
        result = {"status": "broken", "error": str(e)}
    if result is not None and result.get("status") != "broken":
        return Run(path, result.get("config", {}), result, list(result.get("overrides", [])))
    hydra_dir = path / ".hydra"
    if not (path / HYDRA_CONFIG).is_file():
        if result is not None:
            return Run(path, {}, result, [])
        raise FileNotFoundError(f"{path} is not a run dir (no result.json and no {HYDRA_CONFIG}); point at a "
                                f"folder a `python run.py` job wrote")
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
    overrides = OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml")) \
        if (hydra_dir / "overrides.yaml").is_file() else []
    return Run(path, config, result or {"status": "incomplete"}, list(overrides))


def _override_key(override: str) -> tuple[str | None, str]:
    key, _, value = override.partition("=")
    if key.startswith("~"):
        return None, value
    return key.lstrip("+"), value


_MISSING = object()


def _lookup(config: dict, dotted: str):
    """The value at ``dotted`` in a nested config dict, or ``_MISSING``."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _cell(node):
    """A table cell: a scalar as it is, anything else as JSON."""
    return node if isinstance(node, (int, float, str, bool)) or node is None else json.dumps(node)


def _value_of(run: Run, key: str, raw: str):
    if key in GROUPS:
        return raw
    node = _lookup(run.config, key)
    return raw if node is _MISSING else _cell(node)


#: Config values every row holds, swept or not (the analyses select and group on them): column → dotted key
#: of the resolved config.
CONFIG_COLUMNS = {"adapter": "adapter.name", "task": "task.name", "model": "model.name", "targets": "targets",
                  "layers": "layers", "rank": "rank", "alpha": "alpha", "seed": "seed", "name": "name",
                  "lr": "trainer.lr"}
#: Numbers of result.json every row holds, after the metrics.
RESULT_COLUMNS = ("metric", "trainable_params", "total_params", "steps", "train_time_s", "wall_time_s", "peak_memory_mb",
                  "peak_gpu_memory_mb", "rss_at_start_mb", "error", "failed_step")


def _config_value(config: dict, dotted: str):
    node = _lookup(config, dotted)
    if node is _MISSING:
        return None
    if isinstance(node, list):  # targets, layers: "q,v" (analysis.tables reads both forms)
        return ",".join(map(str, node))
    return _cell(node)


def run_row(run: Run, root: Path | None = None) -> dict:
    """One row of a sweep table: ``run`` (folder, relative to ``root``), the swept keys (the job's overrides,
    with typed values), ``status``, the config columns (``CONFIG_COLUMNS``), ``final/<metric>`` and
    ``best/<metric>`` for every eval metric, ``best_step``, the result columns (``RESULT_COLUMNS``) and the
    cost model's prediction as ``predicted/<component>``."""
    row = {"run": str(run.dir.relative_to(root)) or "." if root is not None else str(run.dir)}
    swept = {}
    for override in run.overrides:
        key, raw = _override_key(override)
        if key is not None and not key.startswith("hydra"):
            swept[key] = _value_of(run, key, raw)
    row.update(swept)
    row["status"] = run.status
    for column, dotted in CONFIG_COLUMNS.items():
        if column not in swept:
            row[column] = _config_value(run.config, dotted)
    r = run.result
    for part in ("final", "best"):
        for k, v in (r.get(part) or {}).items():
            if k.startswith("eval/"):
                row[f"{part}/{k[5:]}"] = v
    row["best_step"] = (r.get("best") or {}).get("step")
    for k in RESULT_COLUMNS:
        row[k] = r.get(k)
    for k, v in (r.get("predicted_costs") or {}).items():
        row[f"predicted/{k}"] = v
    return row


def rows(paths, *, finished_only: bool = False) -> list[dict]:
    """``run_row`` of every run directory at or below each of ``paths`` (a run dir or a sweep dir); ``run``
    is relative to the path it was found under. ``finished_only``: runs with a result.json only."""
    out = []
    for root in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        out += [run_row(load_run(d), root) for d in run_dirs(root, finished_only=finished_only)]
    return out


def load_sweep(path) -> pd.DataFrame:
    """One row per run dir under ``path`` (``run_row``): ``run``, the swept keys, ``status``, then the config
    columns, the metrics and the result columns."""
    import pandas as pd

    found = rows(path)
    df = pd.DataFrame(found)
    if df.empty:
        return df
    keys = list(dict.fromkeys(k for row in found for k in _swept_keys(row)))
    first = ["run", *keys, "status"]
    return df[first + [c for c in df.columns if c not in first]]


def _swept_keys(row: dict) -> list[str]:
    """The keys of ``row`` before ``status`` (the swept ones, in ``run_row``'s order)."""
    keys = list(row)
    return keys[1:keys.index("status")]


def aggregate(sweep_dir) -> pd.DataFrame:
    """Write ``aggregate.csv`` and ``aggregate.parquet`` (``load_sweep``) into ``sweep_dir``; return the table."""
    root = Path(sweep_dir)
    df = load_sweep(root)
    df.to_csv(root / f"{AGGREGATE}.csv", index=False)
    table = df.copy()
    for column in table.columns:  # parquet needs one type per column
        if table[column].dtype == object:
            table[column] = table[column].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v))
                                              else str(v))
    table.to_parquet(root / f"{AGGREGATE}.parquet", index=False)
    return df


def _show(df: pd.DataFrame) -> str:
    import pandas as pd

    hidden = ("error", "peak_memory_mb", "failed_step", "final/loss")
    cols = [c for c in df.columns if c not in hidden]
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4f}".format):
        return df[cols].to_string(index=False)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency; keep results importable without it
    Callback = object


class AggregateCallback(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): build the sweep's table when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            df = aggregate(sweep_dir)
        except Exception as e:  # noqa: BLE001 - never turn a finished sweep into a crash
            log.warning("could not aggregate %s (%s); run `python -m lowrank.runner.results aggregate %s`", sweep_dir, e,
                        sweep_dir)
            return
        print(f"\n{_show(df)}\n\nsweep table: {sweep_dir / (AGGREGATE + '.csv')} (and .parquet)", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "aggregate":
        print("usage: python -m lowrank.runner.results aggregate <sweep_dir>", file=sys.stderr)
        return 2
    root = Path(argv[1])
    if not root.is_dir():
        print(f"error: {root} is not a folder; fix: pass the sweep dir (hydra.sweep.dir)", file=sys.stderr)
        return 2
    df = aggregate(root)
    print(_show(df) if not df.empty else "(no run dirs found)")
    print(f"\nwrote {root / (AGGREGATE + '.csv')} and {root / (AGGREGATE + '.parquet')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
