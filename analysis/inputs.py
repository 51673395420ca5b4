"""Run and sweep directories → the arrays the analyses need, through `lowrank.runner.results` only.

Owns: finding run directories under the paths a user gives, describing a run by its config (adapter,
rank, seed, targets, task), choosing runs (r=8 vs r=64, two seeds), and re-keying a run's per-module
tensors by (layer, matrix kind). Never imports training code: `lowrank.runner.results` is the one door.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import sys

from analysis.names import parse_module_name
from lowrank.runner.results import RESULT, run_dirs

__all__ = [
    "RunInfo",
    "find_run_dirs",
    "load_runs",
    "describe",
    "by_layer",
    "select",
    "sweep_root",
    "load_sweep_table",
    "layer_indices",
]


@dataclass
class RunInfo:
    """A loaded run and the config values the analyses select on."""

    run: object  # lowrank.runner.results.Run
    adapter: str
    rank: int | None
    alpha: float | None
    seed: int | None
    targets: tuple[str, ...]
    task: str | None
    model: str | None
    status: str | None

    @property
    def dir(self) -> Path:
        return Path(self.run.dir)

    def label(self) -> str:
        parts = [self.adapter]
        if self.rank is not None:
            parts.append(f"r={self.rank}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return " ".join(parts)


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories that finished (those holding result.json) and PEFT adapter folders (adapter_config.json,
    outside any run directory) at or below each path, sorted, without duplicates. Run directories that have
    not finished (a job still running or killed) are skipped with one line naming them."""
    from analysis.peft_input import PEFT_CONFIG, is_peft_dir

    found: dict[Path, None] = {}
    unfinished: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; pass a run directory or a sweep directory (multirun/...)")
        runs = [q.resolve() for q in run_dirs(p)]
        done = [q.resolve() for q in run_dirs(p, finished_only=True)]
        unfinished += [q for q in runs if q not in done]
        # a run's own adapter/ folder (finished or not) is never a PEFT folder of its own
        hits = done + sorted(q.parent.resolve() for q in ([p / PEFT_CONFIG] if is_peft_dir(p) else p.rglob(PEFT_CONFIG))
                             if is_peft_dir(q.parent) and not any(r == q.parent.resolve() or r in q.resolve().parents
                                                                  for r in runs))
        if not hits:
            where = f"; {len(unfinished)} run(s) have not finished: {', '.join(map(str, unfinished))}" if unfinished else ""
            raise FileNotFoundError(f"no run directory (with {RESULT}) or PEFT adapter folder (with "
                                    f"{PEFT_CONFIG}) under {p}{where}; did the runs finish?")
        for h in hits:
            found[h] = None
    if unfinished:
        print(f"skipped {len(unfinished)} run(s) that have not finished (no {RESULT}): "
              f"{', '.join(map(str, unfinished))}", file=sys.stderr)
    return list(found)


def _get(cfg: Mapping, *keys, default=None):
    for key in keys:
        cur = cfg
        ok = True
        for part in key.split("."):
            if isinstance(cur, Mapping) and part in cur:
                cur = cur[part]
            else:
                ok = False
                break
        if ok and cur is not None:
            return cur
    return default


def describe(run) -> RunInfo:
    """The selection keys of a loaded `lowrank.runner.results.Run`."""
    cfg = run.config or {}
    adapter = _get(cfg, "adapter.name", "adapter", default="?")
    if isinstance(adapter, Mapping):
        adapter = adapter.get("name", "?")
    targets = _get(cfg, "targets", "adapter.targets", default=())
    if isinstance(targets, str):
        targets = [t for t in targets.replace("[", "").replace("]", "").split(",") if t.strip()]
    rank = _get(cfg, "rank", "adapter.rank")
    seed = _get(cfg, "seed")
    alpha = _get(cfg, "alpha", "adapter.alpha")
    task = _get(cfg, "task.name", "task")
    model = _get(cfg, "model.name", "model")
    result = getattr(run, "result", None) or {}
    return RunInfo(
        run=run,
        adapter=str(adapter),
        rank=int(rank) if rank is not None else None,
        alpha=float(alpha) if alpha is not None else None,
        seed=int(seed) if seed is not None else None,
        targets=tuple(str(t).strip() for t in targets),
        task=str(task) if task is not None and not isinstance(task, Mapping) else None,
        model=str(model) if model is not None and not isinstance(model, Mapping) else None,
        status=result.get("status"),
    )


def load_runs(paths: Iterable[str | Path], *, completed_only: bool = True, progress: bool = False,
              base_model: str | None = None) -> list[RunInfo]:
    """Load every run under `paths` through `lowrank.runner.results.load_run`, and every PEFT adapter folder
    through `analysis.peft_input.PeftRun` (on `base_model`, default: the one its config names)."""
    from analysis.peft_input import PeftRun, is_peft_dir

    try:
        from lowrank.runner.results import load_run
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"lowrank.runner.results is not importable ({e}); install the project with `make setup`") from e
    dirs = find_run_dirs(paths)
    it = dirs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(dirs, desc="loading runs", unit="run")
    infos = [describe(PeftRun(d, base_model) if is_peft_dir(d) else load_run(d)) for d in it]
    if completed_only:
        done = [i for i in infos if i.status in (None, "completed")]
        if not done:
            raise ValueError(f"none of the {len(infos)} runs under {list(map(str, paths))} completed; check result.json")
        infos = done
    return infos


def by_layer(per_module: Mapping[str, object], *, kinds: Iterable[str] | None = None) -> dict[tuple[int, str], object]:
    """{module name: x} → {(layer, kind): x}, keeping attention matrices (optionally only `kinds`)."""
    out = {}
    keep = set(kinds) if kinds is not None else None
    for name, x in per_module.items():
        layer, kind = parse_module_name(name)
        if layer is None or kind is None or (keep is not None and kind not in keep):
            continue
        if (layer, kind) in out:
            raise ValueError(f"two modules map to layer {layer} {kind!r} (one is {name}); pass explicit modules")
        out[(layer, kind)] = x
    return out


def layer_indices(keys: Iterable[tuple[int, str]]) -> list[int]:
    return sorted({layer for layer, _ in keys})


def select(
    infos: Sequence[RunInfo],
    *,
    rank: int | None = None,
    seed: int | None = None,
    adapter: str | None = None,
    what: str = "run",
) -> list[RunInfo]:
    """Runs matching every given key; an error listing what exists when nothing matches."""
    hits = [
        i
        for i in infos
        if (rank is None or i.rank == rank)
        and (seed is None or i.seed == seed)
        and (adapter is None or i.adapter.lower() == adapter.lower())
    ]
    if not hits:
        have = sorted({(i.adapter, i.rank, i.seed) for i in infos}, key=str)
        want = {k: v for k, v in dict(adapter=adapter, rank=rank, seed=seed).items() if v is not None}
        raise LookupError(f"no {what} with {want}; the inputs have (adapter, rank, seed) in {have}")
    return hits


def sweep_root(paths: Sequence[str | Path], infos: Sequence[RunInfo] = ()) -> Path:
    """Where analysis output goes by default: the one sweep directory given, else the runs' common parent."""
    if len(paths) == 1 and not (Path(paths[0]) / RESULT).is_file():
        return Path(paths[0])
    dirs = [i.dir for i in infos] or [Path(p).resolve() for p in paths]
    if len(dirs) == 1:
        return dirs[0]
    import os

    return Path(os.path.commonpath([str(d) for d in dirs]))


def load_sweep_table(paths: Sequence[str | Path]):
    """The sweep table of one or more sweep directories (`lowrank.runner.results.load_sweep`: every row holds
    the config columns adapter, targets, rank, seed, task, ... whether swept or not), concatenated, with
    ``attrs["metric"]`` the task's own metric (tables pick best/<metric> by default)."""
    import pandas as pd

    from lowrank.runner.results import load_sweep

    frames = []
    for p in paths:
        df = load_sweep(p)
        if df.empty:
            raise FileNotFoundError(f"no run directories under {p}; pass the sweep dir a `python run.py -m` wrote")
        df.insert(0, "sweep", str(p))
        frames.append(df)
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    metric = next((m for m in out.get("metric", pd.Series(dtype=object)) if isinstance(m, str)), None)
    if metric:
        out.attrs["metric"] = metric.removeprefix("eval/")
    return out
