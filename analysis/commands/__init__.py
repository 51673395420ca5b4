"""One module per family of `python -m analysis` commands. Each command takes the parsed arguments,
writes its figures, tables and arrays, and returns a ``Produced``: the typed summary plus the files, which
the CLI writes (summary.json), prints and mirrors to W&B."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from analysis.summaries import Summary


@dataclass
class Produced:
    summary: Summary
    out: Path
    files: list[Path]
    tables: dict | None = None
    run_configs: list[dict] | None = None   # the runs' configs (W&B settings); None: W&B only when asked
    inputs: list[str] = field(default_factory=list)
