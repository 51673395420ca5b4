"""``python -m experiments --list`` | ``python -m experiments <recipe> [--dir D] [run.py overrides ...]``.

Runs a recipe end to end: its sweep(s) through ``run.py`` (completed jobs are skipped, interrupted ones
resume), its analyses through ``python -m analysis``, then writes ``report.md`` and ``report.json`` into
the sweep directory: our numbers beside the paper's, each claim marked yes/NO. Extra arguments are
passed to every ``run.py`` call, e.g. ``model=roberta-base`` for a paper-scale model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.recipes import RECIPES, Recipe
from lowrank.atomic import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"experiments: command failed with exit code {done.returncode}: {' '.join(cmd)}")


def run_dir_override(path: Path) -> str:
    """``hydra.run.dir=...`` with the path quoted: run subdirs are named like sweep jobs (``adapter=full``),
    and an unquoted ``=`` in an override value is a Hydra grammar error."""
    return f"hydra.run.dir='{path}'"


def run_recipe(recipe: Recipe, sweep_dir: Path, overrides: list[str], train: bool = True) -> dict:
    started = time.time()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for args in recipe.sweeps if train else []:
        _run([sys.executable, "run.py", "-m", *args, *overrides, f"hydra.sweep.dir={sweep_dir}"])
    for subdir, args in recipe.extra_runs if train else []:
        _run([sys.executable, "run.py", *args, *overrides, run_dir_override(sweep_dir / subdir)])
    if recipe.extra_runs and train:
        _run([sys.executable, "-m", "lowrank.runner.results", "aggregate", str(sweep_dir)])
    for args in recipe.analyses:
        _run([sys.executable, "-m", "analysis", *args, str(sweep_dir), "--no-progress"])
    if recipe.collect is not None:
        recipe.collect(sweep_dir)
    checks = recipe.checks(sweep_dir)
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
        lines += recipe.tables(sweep_dir)
    report = {"recipe": recipe.name, "artefact": recipe.artefact, "sweep_dir": str(sweep_dir), "wall_s": wall,
              "headline": headline, "overrides": overrides,
              "checks": [{"what": c.what, "ours": c.ours, "paper": c.paper, "holds": c.holds} for c in checks]}
    stem = sweep_dir / f"report_{recipe.name}"
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    write_json(stem.with_suffix(".json"), report)
    print("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="recipe name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the recipes")
    parser.add_argument("--dir", default=None, help="sweep directory (default: outputs/experiments/<sweep>)")
    parser.add_argument("--analyse-only", action="store_true",
                        help="analyse and report on the runs already in --dir (no training)")
    args, overrides = parser.parse_known_args(argv)
    if args.list or not args.recipe:
        width = max(map(len, RECIPES))
        for r in RECIPES.values():
            print(f"{r.name:<{width}}  {r.artefact}  [{r.budget}]")
        return 0
    recipe = RECIPES.get(args.recipe)
    if recipe is None:
        print(f"python -m experiments: unknown recipe {args.recipe!r}; choose one of: {', '.join(RECIPES)}",
              file=sys.stderr)
        return 2
    sweep_dir = Path(args.dir or ROOT / "outputs" / "experiments" / recipe.sweep).resolve()
    run_recipe(recipe, sweep_dir, overrides, train=not args.analyse_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
