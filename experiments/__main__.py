"""``python -m experiments --list`` | ``python -m experiments <recipe> [<recipe> ...] [--dir D] [--jobs N]
[run.py overrides ...]``.

Runs a recipe end to end: its sweep(s) through ``run.py`` (completed jobs are skipped, interrupted ones
resume), its analyses through ``python -m analysis``, then writes ``report.md`` and ``report.json`` into
the sweep directory: our numbers beside the paper's, each claim marked yes/NO. Extra arguments are
passed to every ``run.py`` call, e.g. ``model=roberta-base`` for a paper-scale model. ``--jobs N`` trains
N runs at a time (several small runs share one GPU well), the runs of all the recipes named in one pool.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from experiments.portable import portable
from experiments.recipes import RECIPES, Check, Recipe
from lowrank.atomic import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], check: bool = True) -> int:
    """Run ``cmd`` from the repository root; a failure stops the program when ``check``, else its exit code
    is returned."""
    print("$", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code != 0 and check:
        raise SystemExit(f"experiments: command failed with exit code {code}: {' '.join(cmd)}")
    return code


def run_dir_override(path: Path) -> str:
    """``hydra.run.dir=...`` with the path quoted: run subdirs are named like sweep jobs (``adapter=full``),
    and an unquoted ``=`` in an override value is a Hydra grammar error."""
    return f"hydra.run.dir='{path}'"


def training_commands(recipe: Recipe, sweep_dir: Path, overrides: list[str]) -> list[list[str]]:
    """The run.py calls of a recipe: its sweeps (``-m``) and its single runs, longest-first as listed."""
    return ([[sys.executable, "run.py", "-m", *args, *overrides, f"hydra.sweep.dir={sweep_dir}"]
             for args in recipe.sweeps] +
            [[sys.executable, "run.py", *args, *overrides, run_dir_override(sweep_dir / subdir)]
             for subdir, args in recipe.extra_runs])


def run_pool(commands: list[list[str]], jobs: int, deadline: float | None = None) -> list[str]:
    """Run ``commands`` ``jobs`` at a time, each quietly into its own log; after ``deadline`` seconds no new
    command starts and those still running are stopped. Returns one line per command that did not finish."""
    import tempfile

    logs = Path(tempfile.mkdtemp(prefix="experiments-"))
    pending, running, failed = list(enumerate(commands)), {}, []
    start = time.time()
    while pending or running:
        late = deadline is not None and time.time() - start > deadline
        while pending and len(running) < jobs and not late:
            i, cmd = pending.pop(0)
            print("$", " ".join(cmd), flush=True)
            running[i] = (subprocess.Popen(cmd, cwd=ROOT, stdout=open(logs / f"{i}.log", "w"),
                                           stderr=subprocess.STDOUT), cmd)
        if late:
            for i, (proc, cmd) in running.items():
                proc.terminate()
                failed.append(f"stopped at the {deadline:.0f} s deadline: {' '.join(cmd[2:])}")
            failed += [f"not started before the deadline: {' '.join(cmd[2:])}" for _, cmd in pending]
            break
        for i, (proc, cmd) in list(running.items()):
            if proc.poll() is not None:
                del running[i]
                if proc.returncode != 0:
                    tail = (logs / f"{i}.log").read_text().strip().splitlines()[-1:] or [""]
                    failed.append(f"exit {proc.returncode}: {' '.join(cmd[2:])}: {tail[0]}")
        time.sleep(0.5)
    for line in failed:
        print("experiments:", line, file=sys.stderr)
    return failed


def analysis_command(args: list[str], sweep_dir: Path) -> list[str]:
    """``python -m analysis`` with ``{dir}`` in the arguments replaced by the sweep directory; without a
    ``{dir}``, the sweep directory is the input."""
    if any("{dir}" in a for a in args):
        return [sys.executable, "-m", "analysis", *[a.replace("{dir}", str(sweep_dir)) for a in args], "--no-progress"]
    return [sys.executable, "-m", "analysis", *args, str(sweep_dir), "--no-progress"]


def run_recipe(recipe: Recipe, sweep_dir: Path, overrides: list[str], train: bool = True) -> dict:
    started = time.time()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for cmd in training_commands(recipe, sweep_dir, overrides) if train else []:
        _run(cmd)
    if recipe.extra_runs:
        _run([sys.executable, "-m", "lowrank.runner.results", "aggregate", str(sweep_dir)])
    for args in recipe.analyses:
        cmd = analysis_command(args, sweep_dir)
        # a tolerant recipe reports what could be analysed: better than no report when a run is missing
        if _run(cmd, check=not recipe.tolerant) != 0:
            print(f"experiments: analysis failed: {' '.join(cmd[3:])}", file=sys.stderr)
    if recipe.collect is not None:
        recipe.collect(sweep_dir)
    try:
        checks = recipe.checks(sweep_dir)
    except FileNotFoundError as e:
        if not recipe.tolerant:
            raise
        checks = [Check(f"not analysed: {e}", "-")]
    wall = time.time() - started
    lines = [f"# {recipe.name}: {recipe.artefact}", "",
             f"Paper setting: {recipe.reference['source']}.", "",
             f"Claim: {recipe.reference.get('claim') or '; '.join(recipe.reference.get('claims', []))}", "",
             f"Ours: {sweep_dir} (overrides: {' '.join(overrides) or 'none'}); recipe wall time {wall:.0f} s "
             f"(budget: {recipe.budget}).", "",
             "| quantity | ours | paper | claim holds |", "|---|---|---|---|", *[c.line() for c in checks]]
    judged = [c for c in checks if c.holds is not None]
    headline = f"{recipe.name}: {sum(c.holds for c in judged)}/{len(judged)} paper claims hold"
    lines += ["", f"**{headline}**", ""]
    if recipe.tables is not None:
        try:
            lines += recipe.tables(sweep_dir)
        except FileNotFoundError as e:
            lines += ["", f"(tables not written: {e})"]
    report = {"recipe": recipe.name, "artefact": recipe.artefact, "sweep_dir": str(sweep_dir), "wall_s": wall,
              "headline": headline, "overrides": overrides,
              "checks": [{"what": c.what, "ours": c.ours, "paper": c.paper, "holds": c.holds} for c in checks]}
    stem = sweep_dir / f"report_{recipe.name}"
    lines, report = portable(lines), portable(report)  # reports get committed: no machine's paths in them
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    write_json(stem.with_suffix(".json"), report)
    print("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="*", help="recipe name(s) (see --list)")
    parser.add_argument("--list", action="store_true", help="list the recipes")
    parser.add_argument("--markdown", action="store_true", help="with --list: as the README's markdown table")
    parser.add_argument("--dir", default=None, help="sweep directory (default: outputs/experiments/<sweep>)")
    parser.add_argument("--analyse-only", action="store_true",
                        help="analyse and report on the runs already in --dir (no training)")
    parser.add_argument("--train-only", action="store_true", help="train, then stop before the analyses")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time (all recipes named share the pool)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no run starts and running ones stop (with --jobs)")
    args, overrides = parser.parse_known_args(argv)
    if args.list or not args.recipe:
        width = max(map(len, RECIPES))
        if args.markdown:
            print("| recipe | paper artefact | budget (the embedded default on a 2-core CPU, or the GPU named) |\n|---|---|---|")
        for r in RECIPES.values():
            print(f"| `{r.name}` | {r.artefact} | {r.budget} |" if args.markdown else
                  f"{r.name:<{width}}  {r.artefact}  [{r.budget}]")
        return 0
    unknown = [name for name in args.recipe if name not in RECIPES]
    if unknown:
        print(f"python -m experiments: unknown recipe {unknown[0]!r}; choose one of: {', '.join(RECIPES)}",
              file=sys.stderr)
        return 2
    if args.dir and len(args.recipe) > 1:
        print("python -m experiments: --dir names one recipe's sweep directory; with several recipes give none "
              "(each goes to outputs/experiments/<sweep>)", file=sys.stderr)
        return 2
    recipes = [RECIPES[name] for name in args.recipe]
    dirs = [Path(args.dir or ROOT / "outputs" / "experiments" / r.sweep).resolve() for r in recipes]
    train = not args.analyse_only
    commands = [c for r, d in zip(recipes, dirs) for c in training_commands(r, d, overrides)]
    if train and (args.jobs > 1 or args.deadline):
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        run_pool(commands, args.jobs, args.deadline)
        train = False
    if args.train_only:
        for cmd in commands if train else []:
            _run(cmd)
        return 0
    for recipe, sweep_dir in zip(recipes, dirs):
        run_recipe(recipe, sweep_dir, overrides, train=train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
