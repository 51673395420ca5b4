"""One recipe per paper artefact: its sweep (a ``conf/experiment`` preset), its analysis, the paper's
reference numbers and the qualitative claims to check.

A recipe never reaches into training code: it runs ``run.py`` (which skips completed jobs and resumes
interrupted ones, so a finished sweep is reused, not re-trained), then ``python -m analysis`` on the
sweep directory, then reads the analysis' typed summary (``analysis.summaries.load_summary``) to write a
report of our numbers beside the paper's.

Each module below lists its recipes in a module-level ``RECIPES`` list; adding a family of recipes is a
module here plus its name in ``MODULES``.
"""

from __future__ import annotations

from importlib import import_module

from experiments.recipes.base import QUICK, Check, Recipe

MODULES = ("lora", "lora_long", "dora", "flora", "methods", "beyond", "vision")


def _registry() -> dict[str, Recipe]:
    out: dict[str, Recipe] = {}
    for module in MODULES:
        for recipe in import_module(f"experiments.recipes.{module}").RECIPES:
            if recipe.name in out:
                raise ValueError(f"recipe {recipe.name!r} is defined twice (in experiments.recipes.{module})")
            out[recipe.name] = recipe
    return out


RECIPES: dict[str, Recipe] = _registry()

__all__ = ["RECIPES", "Recipe", "Check", "QUICK", "MODULES"]
