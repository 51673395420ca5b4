"""Run and sweep directories → the arrays the analyses need, through `lowrank.runner.results` only.

Owns: finding run directories under the paths a user gives, describing a run by its config (adapter,
rank, seed, targets, task), choosing runs (r=8 vs r=64, two seeds), and re-keying a run's per-module
tensors by (layer, matrix kind). Never imports training code: `lowrank.runner.results` is the one door.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis.names import parse_module_name
from lowrank.runner.rundir import run_dirs

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
    """Run directories (those holding result.json) and PEFT adapter folders (adapter_config.json) at or below
    each path, sorted, without duplicates."""
    from analysis.peft_input import PEFT_CONFIG, is_peft_dir

    found: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; pass a run directory or a sweep directory (multirun/...)")
        hits = [q.resolve() for q in run_dirs(p, finished_only=True)]
        hits += sorted(q.parent.resolve() for q in ([p / PEFT_CONFIG] if is_peft_dir(p) else p.rglob(PEFT_CONFIG))
                       if is_peft_dir(q.parent) and not any(h in q.resolve().parents for h in hits))
        if not hits:
            raise FileNotFoundError(f"no run directory (with result.json) or PEFT adapter folder (with "
                                    f"{PEFT_CONFIG}) under {p}; did the runs finish?")
        for h in hits:
            found[h] = None
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
    if len(paths) == 1 and not (Path(paths[0]) / "result.json").is_file():
        return Path(paths[0])
    dirs = [i.dir for i in infos] or [Path(p).resolve() for p in paths]
    if len(dirs) == 1:
        return dirs[0]
    import os

    return Path(os.path.commonpath([str(d) for d in dirs]))


def load_sweep_table(paths: Sequence[str | Path], *, fill: Sequence[str] = ("adapter", "targets", "rank", "seed", "task")):
    """The aggregate table of one or more sweep directories (`lowrank.runner.results.load_sweep`), concatenated.

    The table holds only the keys a sweep varied; the `fill` keys it lacks (e.g. targets when only rank
    was swept) are read from each run's resolved config so that Tables 5-6 can group on them.
    """
    import pandas as pd

    from lowrank.runner.results import load_run, load_sweep

    frames = []
    for p in paths:
        df = load_sweep(p)
        if df.empty:
            raise FileNotFoundError(f"no run directories under {p}; pass the sweep dir a `python run.py -m` wrote")
        missing = [k for k in fill if k not in df.columns or df[k].isna().any()]
        if missing:
            described = [describe(load_run(Path(p) / r)) for r in df["run"]]
            for key in missing:
                vals = [getattr(i, key) for i in described]
                if key == "targets":
                    vals = [",".join(v) for v in vals]
                if key not in df.columns:
                    df[key] = vals
                else:
                    df[key] = df[key].where(df[key].notna(), pd.Series(vals, index=df.index))
        df.insert(0, "sweep", str(p))
        frames.append(df)
        cfg = load_run(Path(p) / df["run"].iloc[0]).config or {}
        metric = _get(cfg, "task.metric")
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if metric:
        out.attrs["metric"] = str(metric)  # the task's own metric: tables pick best/<metric> by default
    return out
