"""Choosing the runs and matrices an analysis compares, and where its output goes.

Adapters are told apart through the registry (``lowrank.adapters.ADAPTERS``) alone: a method with low-rank
factors (``has_factors``: lora, dora, flora) feeds the subspace analyses, which read A and B; a method whose
target weight matrices change (``has_delta``: those, (IA)³, full, top, gradual) feeds the weight analyses,
which read ΔW = W − W0 (``Run.deltas``, ``Run.weight_trajectory``); others are refused with one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lowrank.adapters import ADAPTERS

__all__ = ["UsageError", "progress", "out_dir", "load", "adapter_spec", "label", "usable", "refusal", "factor_runs",
           "delta_runs", "with_delta", "updated", "directions_by_layer", "need", "middle", "spread_layers", "pick_pair_seed", "two_ranks", "two_seeds",
           "chosen_seed", "one_run_per_rank"]


class UsageError(Exception):
    """A bad input the user can fix; printed as one line."""


def progress(args) -> bool:
    return not args.no_progress and sys.stderr.isatty() or args.progress


def out_dir(args, infos, name: str) -> Path:
    from analysis.inputs import sweep_root

    root = Path(args.out) if args.out else sweep_root(args.paths, infos) / "analysis"
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def load(args):
    from analysis.inputs import load_runs

    return load_runs(args.paths, progress=progress(args), base_model=getattr(args, "base_model", None))


def adapter_spec(name: str):
    """The registry entry of a run's adapter name (``ft`` is full fine-tuning), or None."""
    name = name.lower()
    return ADAPTERS.get("full" if name == "ft" else name)


def label(name: str) -> str:
    spec = adapter_spec(name)
    return spec.label if spec is not None else name


#: what each kind of analysis reads: the registry's predicate, and its words in a refusal
_NEEDS = {"factors": (lambda s: s.has_factors, "low-rank factors", "A and B"),
          "delta": (lambda s: s.has_delta, "weight update ΔW = W − W0", "ΔW")}


def _has(spec, need: str) -> bool:
    return spec is not None and _NEEDS[need][0](spec)


def usable(need: str) -> list[str]:
    """The registry's adapters with what an analysis reads (``need``: factors or delta)."""
    return [n for n, s in ADAPTERS.items() if _NEEDS[need][0](s)]


def refusal(names, need: str) -> str:
    """One line: which of ``names`` lack what the analysis reads (``need``: factors or delta), and the
    adapters whose runs it takes."""
    _, what, reads = _NEEDS[need]
    refused = [f"{n} ({label(n)})" for n in names if not _has(adapter_spec(n), need)]
    line = (f"adapter {', '.join(refused) or ', '.join(names)} has no {what}; this analysis reads {reads}: "
            f"pass runs of {', '.join(usable(need))}")
    if need == "factors":
        other = [n for n, s in ADAPTERS.items() if s.has_delta and not s.has_factors]
        line += f" (for ΔW of {', '.join(other)}: amplification, spectrum, decomposition)"
    return line


def _runs_of(infos, adapter: str | None, need: str):
    """The runs of one adapter with what ``need`` names: ``adapter``, else LoRA when present, else the only one."""
    if adapter is not None:
        spec = adapter_spec(adapter)
        if spec is None:
            raise UsageError(f"--adapter {adapter!r} is not a known adapter; choose one of {', '.join(ADAPTERS)}")
        if not _has(spec, need):
            raise UsageError(refusal([adapter], need))
    runs = [i for i in infos if _has(adapter_spec(i.adapter), need)]
    if not runs:
        raise UsageError(refusal(sorted({i.adapter for i in infos}), need))
    names = sorted({i.adapter.lower() for i in runs})
    want = adapter.lower() if adapter else ("lora" if "lora" in names else names[0] if len(names) == 1 else None)
    if want is None:
        raise UsageError(f"the inputs mix adapters {names}; pick one with --adapter")
    picked = [i for i in runs if i.adapter.lower() == want]
    if not picked:
        raise UsageError(f"--adapter {adapter} has no runs; adapters present: {names}")
    return picked


def factor_runs(infos, adapter: str | None = None):
    """The runs of one low-rank adapter (registry ``has_factors``)."""
    return _runs_of(infos, adapter, "factors")


def delta_runs(infos, adapter: str | None = None):
    """The runs of one adapter with a weight update ΔW (registry ``has_delta``)."""
    return _runs_of(infos, adapter, "delta")


def with_delta(infos, seed=None):
    """Every run whose adapter has a weight update ΔW (registry ``has_delta``), of ``seed`` when given; a one-line
    refusal when none has."""
    runs = [i for i in infos if _has(adapter_spec(i.adapter), "delta")]
    if not runs:
        raise UsageError(refusal(sorted({i.adapter for i in infos}), "delta"))
    if seed is not None:
        seeds = sorted({i.seed for i in runs}, key=str)
        runs = [i for i in runs if i.seed == seed]
        if not runs:
            raise UsageError(f"no run with a weight update at --seed {seed}; seeds present: {seeds}")
    return runs


def updated(deltas: dict) -> dict:
    """The modules whose ΔW is not identically zero: a block-wise method (top, gradual) leaves the blocks it
    never trained at W0, and the weight analyses describe the update, so those are left out."""
    return {m: d for m, d in deltas.items() if bool(d.any())}


def directions_by_layer(info, factor: str = "A"):
    """{(layer, kind): a matrix whose right singular vectors are the directions compared}: A (r, in) as in
    the paper; Bᵀ (r, out) for footnote 7's variant (right singular vectors of Bᵀ = left ones of B); or
    Σ·Vh of ΔW = s·B·A (r, in), i.e. ΔW's right singular directions in ΔW's own order."""
    from analysis.inputs import by_layer

    factors = info.run.factors()
    if not factors:
        raise UsageError(f"run {info.dir}: {refusal([info.adapter], 'factors')}")
    if factor == "B":
        return by_layer({m: f["B"].T for m, f in factors.items()})
    if factor == "dW":
        from analysis.amplification import factored_directions

        def rows(f):
            d = factored_directions(f["A"], f["B"], float(f.get("scaling") or 1.0))
            return d.s[:, None] * d.Vh

        return by_layer({m: rows(f) for m, f in factors.items()})
    return by_layer({m: f["A"] for m, f in factors.items()})


def need(table, key, info, what):
    if key not in table:
        layer, kind = key
        have = sorted(table)
        raise UsageError(
            f"{what}: run {info.dir.name} has no adapted {kind!r} matrix at layer {layer} (has {have[:8]}...); "
            f"pick --layer from those or re-run with targets=[q,v]"
        )
    return table[key]


def middle(layers):
    return layers[len(layers) // 2]


def spread_layers(layers, n=4):
    if len(layers) <= n:
        return list(layers)
    idx = np.unique(np.round(np.linspace(0, len(layers) - 1, n)).astype(int))
    return [layers[i] for i in idx]


def pick_pair_seed(runs, r1, r2, seed):
    """A seed with runs at both ranks (the requested one, else the lowest)."""
    from analysis.inputs import select

    if seed is not None:
        return select(runs, rank=r1, seed=seed)[0], select(runs, rank=r2, seed=seed)[0]
    s1 = {i.seed for i in runs if i.rank == r1}
    s2 = {i.seed for i in runs if i.rank == r2}
    if s1 == {None} and s2 == {None}:  # inputs without a seed (PEFT folders): one run at each rank
        return select(runs, rank=r1)[0], select(runs, rank=r2)[0]
    common = sorted(s for s in s1 & s2 if s is not None)
    if not common:
        raise UsageError(f"no seed has runs at both r={r1} and r={r2} (seeds {sorted(s1, key=str)} vs {sorted(s2, key=str)})")
    return select(runs, rank=r1, seed=common[0])[0], select(runs, rank=r2, seed=common[0])[0]


def two_ranks(runs, ranks):
    have = sorted({i.rank for i in runs})
    if ranks:
        missing = [r for r in ranks if r not in have]
        if missing:
            raise UsageError(f"--ranks {missing} not among the runs' ranks {have}; sweep rank=8,64 or pick from {have}")
        return tuple(ranks)
    if len(have) < 2:
        raise UsageError(f"need runs at two ranks (e.g. rank=8,64), the inputs have only r={have}")
    return have[0], have[-1]


def seeds_at(runs, rank) -> list[int]:
    from analysis.inputs import select

    return sorted({i.seed for i in select(runs, rank=rank) if i.seed is not None})


def two_seeds(runs, rank, seeds):
    from analysis.inputs import select

    at = select(runs, rank=rank)
    have = sorted({i.seed for i in at if i.seed is not None})
    if seeds:
        missing = [s for s in seeds if s not in have]
        if missing:
            raise UsageError(f"--seeds {missing} have no r={rank} run; seeds available at r={rank}: {have}")
        s1, s2 = seeds
    elif len(have) < 2:
        raise UsageError(f"need two seeds at r={rank} (e.g. seed=0,1), the inputs have {have}")
    else:
        s1, s2 = have[:2]
    return select(at, seed=s1)[0], select(at, seed=s2)[0]


def chosen_seed(args, runs):
    """``--seed`` if given, else the lowest seed among ``runs`` (None when none has one)."""
    return args.seed if args.seed is not None else min((i.seed for i in runs if i.seed is not None), default=None)


def one_run_per_rank(args, runs):
    """(ranks, seed, {rank: run}): the asked-for ranks (default all) of one seed (default the lowest)."""
    from analysis.inputs import select

    ranks = sorted({i.rank for i in runs}) if not args.ranks else list(args.ranks)
    seed = chosen_seed(args, runs)
    return ranks, seed, {r: select(runs, rank=r, seed=seed)[0] for r in ranks}
