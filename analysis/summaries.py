"""The typed results of each analysis: what `python -m analysis` writes as summary.json and the recipes read.

Each analysis returns a ``Summary`` dataclass declared beside its command (``analysis/commands/<x>.py``, or
``analysis/costs.py``); the existing ones can also be imported from here by name. ``write_summary`` stores it (atomically) as
``<out>/<analysis>/summary.json``; ``load_summary(Summary, sweep_dir)`` reads it back as the same type,
so that a reader never indexes raw JSON keys or parses formatted table cells.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, TypeVar

from lowrank.atomic import write_json

#: summary class → the command module that declares it (``analysis.commands.<module>``)
_HOMES = {"SubspaceSummary": "subspace", "SeedsSummary": "subspace", "LayersSummary": "subspace",
          "WSubspaceSummary": "subspace", "AmplificationSummary": "amplification",
          "DecompositionSummary": "decomposition", "TablesSummary": "tables", "SpectrumSummary": "spectrum",
          "IntrudersSummary": "intruders", "RanksSummary": "ranks"}

__all__ = ["Summary", "write_summary", "load_summary", "summary_path", *_HOMES]

S = TypeVar("S", bound="Summary")


@dataclass
class Summary:
    analysis: ClassVar[str] = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls: type[S], data: dict) -> S:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def summary_path(sweep_or_out: str | Path, analysis: str) -> Path:
    """<dir>/analysis/<analysis>/summary.json for a sweep dir; <dir>/<analysis>/summary.json for an --out dir."""
    root = Path(sweep_or_out)
    nested = root / "analysis" / analysis / "summary.json"
    return nested if nested.is_file() or not (root / analysis / "summary.json").is_file() else root / analysis / "summary.json"


def write_summary(out_dir: str | Path, summary: Summary) -> Path:
    return write_json(Path(out_dir) / "summary.json", summary.to_json())


def load_summary(cls: type[S], sweep_or_out: str | Path, name: str | None = None) -> S:
    """The ``cls`` summary an analysis wrote under a sweep directory (or an --out directory); ``name`` is the
    output folder when it is not the analysis' own (``decomposition_v`` for Wv)."""
    path = summary_path(sweep_or_out, name or cls.analysis)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `python -m analysis {cls.analysis} {sweep_or_out}` first")
    return cls.from_json(json.loads(path.read_text()))


def __getattr__(name: str):
    """``from analysis.summaries import TablesSummary``: a summary class from the module of its command."""
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f"analysis.commands.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
