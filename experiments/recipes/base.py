"""What a recipe is: its sweep(s), its analyses, the paper's reference numbers and the checks of its claims."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# a short budget for recipes with many runs (Tables 5-6) on the 2-core CPU default
QUICK = ["trainer.max_steps=150", "trainer.eval_every=150", "trainer.checkpoint_every=150"]


@dataclass
class Check:
    """One line of a report: a quantity, our value, the paper's, and whether the paper's claim holds."""

    what: str
    ours: object
    paper: object = None
    holds: bool | None = None

    def line(self) -> str:
        verdict = {True: "yes", False: "NO", None: "-"}[self.holds]
        return f"| {self.what} | {_fmt(self.ours)} | {_fmt(self.paper)} | {verdict} |"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


@dataclass
class Recipe:
    name: str
    artefact: str
    reference: dict
    sweeps: list[list[str]]                  # one run.py -m argument list per sweep, all into one sweep dir
    analyses: list[list[str]]                # `python -m analysis` arguments after the sweep dir is appended
    checks: Callable[[Path], list[Check]]    # reads the analysis summaries of the sweep dir
    budget: str                              # wall time on the embedded default, 2-core CPU (or the GPU named)
    sweep_name: str = ""                     # recipes that analyse the same sweep share its directory
    extra_runs: list[tuple[str, list[str]]] = field(default_factory=list)  # (run subdir, run.py args)
    collect: Callable[[Path], None] | None = None  # writes recipe-specific numbers into the sweep dir
    tables: Callable[[Path], list[str]] | None = None  # extra report lines (markdown), e.g. the paper's table
    tolerant: bool = False   # a failed analysis is reported and the others still run (many-run GPU recipes)

    @property
    def sweep(self) -> str:
        return self.sweep_name or self.name


def markdown(header: list, rows: list[list]) -> list[str]:
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(map(str, row)) + " |" for row in rows]]
