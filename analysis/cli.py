"""`python -m analysis <analysis> <run or sweep dirs> [options]`: the papers' figures and tables from runs.

Each analysis is declared in its own command module (``analysis/commands/<x>.py``: help, flags, function,
summary); ``COMMAND_MODULES`` lists them. ``python -m analysis <analysis> --help`` shows its flags.

Output goes to <sweep>/analysis/<analysis>/ (or --out): PNG + PDF figures, markdown/LaTeX/CSV tables,
the raw arrays (.npz) and summary.json; mirrored to W&B when the runs were configured for it.
"""

from __future__ import annotations

import argparse
import os
import sys

from analysis.commands import Produced
from analysis.selection import UsageError

__all__ = ["main", "build_parser", "commands", "COMMAND_MODULES", "UsageError"]


#: the command modules, in the order ``--help`` lists their commands (each holds ``COMMANDS``)
COMMAND_MODULES = ("subspace", "amplification", "decomposition", "tables", "costs", "spectrum", "intruders", "ranks")


def commands() -> dict:
    """``{name: Command}`` of every module in ``COMMAND_MODULES``."""
    from importlib import import_module

    return {c.name: c for m in COMMAND_MODULES for c in import_module(f"analysis.commands.{m}").COMMANDS}


def _epilog() -> str:
    """What the analyses read, from the adapter registry."""
    from analysis.selection import usable

    return (f"subspace, seeds, layers and wsubspace read the low-rank factors A, B ({', '.join(usable('factors'))}); "
            f"amplification, decomposition and spectrum read ΔW = W − W0 ({', '.join(usable('delta'))}: the "
            f"registry's has_delta). Other adapters are refused with one line.")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def finish(args, name: str, produced: Produced) -> int:
    """Write summary.json beside the outputs, mirror to W&B when configured, print the files."""
    from analysis.summaries import write_summary
    from analysis.wandb_log import log_outputs, wandb_settings

    files = list(produced.files) + [write_summary(produced.out, produced.summary)]
    if produced.run_configs is None:  # a sweep table carries no logger config: W&B only when asked for explicitly
        settings = wandb_settings([], args.wandb) if args.wandb in ("offline", "online") else None
    else:
        settings = wandb_settings(produced.run_configs, args.wandb)
    logged = log_outputs(settings, analysis=name, out_dir=produced.out, files=files, tables=produced.tables,
                         summary=_flat(produced.summary.to_json()), config={"inputs": produced.inputs})
    for f in files:
        print(f)
    if logged:
        print(f"logged to W&B ({settings['mode']}) project {settings['project']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    found = commands()
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__, epilog=_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, command in found.items():
        s = sub.add_parser(name, help=command.help, description=command.help)
        s.add_argument("paths", nargs="+", help="run directories and/or sweep directories")
        s.add_argument("--out", help="output directory (default: <sweep>/analysis)")
        s.add_argument("--wandb", choices=["auto", "off", "offline", "online"], default="auto",
                       help="mirror to W&B: auto = when the runs used the wandb logger (default)")
        s.add_argument("--progress", action="store_true", help="progress bars even when not on a terminal")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.add_argument("--seed", type=int, default=None, help="which training seed's runs to use")
        s.add_argument("--random-seed", type=int, default=0, help="seed of the random baselines")
        command.flags(s)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    args = build_parser().parse_args(argv)
    try:
        return finish(args, args.analysis, commands()[args.analysis].run(args))
    except BrokenPipeError:  # output piped into `head`: the files are written, stop quietly
        sys.stderr.close()
        return 0
    except (UsageError, ValueError, KeyError, LookupError, FileNotFoundError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"python -m analysis {args.analysis}: error: {msg}", file=sys.stderr)
        return 2
