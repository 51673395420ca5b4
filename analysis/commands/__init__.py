"""One module per family of `python -m analysis` commands.

Each module declares its commands (``COMMANDS``: name, help, the flags it reads, the function) beside the
function and the typed summary it returns; ``analysis.cli`` lists the modules (``COMMAND_MODULES``) and adds
only the flags every command shares (paths, --out, --wandb, --progress, --seed, --random-seed). A command
takes the parsed arguments, writes its figures, tables and arrays, and returns a ``Produced``: the summary
plus the files, which the CLI writes (summary.json), prints and mirrors to W&B. A new analysis is one new
module here and one line in ``COMMAND_MODULES``.
"""

from __future__ import annotations

from argparse import ArgumentParser
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from analysis.summaries import Summary


@dataclass
class Produced:
    summary: Summary
    out: Path
    files: list[Path]
    tables: dict | None = None
    run_configs: list[dict] | None = None   # the runs' configs (W&B settings); None: W&B only when asked
    inputs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Command:
    """One `python -m analysis <name>` command: its help line, its own flags, and what it runs."""

    name: str
    help: str
    run: Callable[..., Produced]
    flags: Callable[[ArgumentParser], None] = lambda parser: None


# ---- flags several commands read (each command's ``flags`` picks the ones it uses) ----------------------------

def base_model_flag(p: ArgumentParser) -> None:
    p.add_argument("--base-model", default=None,
                   help="base model of PEFT adapter folders (default: their base_model_name_or_path)")


def adapter_flag(p: ArgumentParser, reads: str) -> None:
    """``--adapter``; the help names the registry's adapters with what the command ``reads`` (factors, delta)."""
    from analysis.selection import usable

    p.add_argument("--adapter", default=None,
                   help=f"adapter whose runs to use, one of {', '.join(usable(reads))} (default: lora when present)")


def factor_flag(p: ArgumentParser) -> None:
    p.add_argument("--factor", choices=["A", "B", "dW"], default="A",
                   help="A: right singular vectors of A (the paper); B: left singular vectors of B (fn. 7); "
                        "dW: right singular vectors of ΔW = sBA")


def layer_flag(p: ArgumentParser) -> None:
    p.add_argument("--layer", type=int, default=None, help="module layer index (default: the middle layer)")


def ranks_flag(p: ArgumentParser, help: str = "ranks to compare (default: all/min+max)") -> None:
    p.add_argument("--ranks", type=int, nargs="+", default=None, help=help)


def seed_pair_flags(p: ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=None, help="rank of the two-seed comparison (default: max)")
    p.add_argument("--seeds", type=int, nargs=2, default=None,
                   help="the two seeds (default: the two lowest; seeds also summarises every pair)")


def matrices_flag(p: ArgumentParser, help: str = "matrix kinds", conv: bool = False) -> None:
    """``--matrices`` (q, k, v, o; with ``conv``, also a ConvNet's convolutions, read as out × in·k·k)."""
    choices = [*"qkvo", "conv"] if conv else list("qkvo")
    p.add_argument("--matrices", nargs="+", choices=choices, default=["q", "v"],
                   help=f"{help}; conv: a ConvNet's convolutions" if conv else help)
