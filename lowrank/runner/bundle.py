"""An offline bundle for GPU nodes without registry access: one folder, one line to install.

    python -m lowrank.runner.bundle BUNDLE [--python-version 3.12] [--models minilm smollm2] [--data DIR]
    make bundle BUNDLE=/scratch/lowrank-bundle                       # the same, through the Makefile

It writes, into ``BUNDLE``:

- ``wheels/``: the packages this project needs beyond a standard PyTorch image (torch,
  numpy, transformers, safetensors, pyarrow, pandas, scipy are assumed there): ``RUNNER_PACKAGES`` below,
  for the node's Python (``--python-version``, ``--platform``), without their dependencies (the list is
  complete for that image). A package with no wheel on the index (antlr4's runtime) is built into one here.
- ``models/<name>/``: a bf16 ``save_pretrained`` copy of each packaged model (``conf/model/<name>.yaml``;
  MiniLM is 45 MB in bf16), loaded on the node with ``model.pretrained=$BUNDLE/models/<name>``;
- ``data/`` (with ``--data``): a copy of a local data dir (``paths.data_dir``);
- ``install.sh``: the one line on the node, ``sh BUNDLE/install.sh`` (pip, ``--no-index``), and
  ``env.sh`` to source: the data dir, offline Hugging Face flags, ``LOWRANK_MODELS``, a writable bytecode
  cache (``PYTHONPYCACHEPREFIX``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from lowrank.runner.config import CONF_DIR


#: What `python run.py` needs beyond a PyTorch image with transformers, pyarrow, pandas and scipy
#: (each with the dependencies those do not bring): datasets, Hydra + OmegaConf (+ antlr4's runtime),
#: the local-parallel launcher, BLEU, PEFT for the benchmarks.
RUNNER_PACKAGES = ["datasets", "dill", "multiprocess", "xxhash", "hydra-core", "omegaconf",
                   "antlr4-python3-runtime==4.9.3", "hydra-joblib-launcher", "joblib", "sacrebleu", "portalocker",
                   "tabulate", "colorama", "lxml", "peft", "accelerate", "psutil"]


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def pinned(packages: list[str]) -> list[str]:
    """``packages`` at the versions of ``constraints.txt`` (the ones the test suite ran against)."""
    pins = {}
    for line in (CONF_DIR.parent / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[name.strip().lower()] = version.strip()
    return [p if "==" in p or p.lower() not in pins else f"{p}=={pins[p.lower()]}" for p in packages]


def download_wheels(folder: Path, packages: list[str], python_version: str, platform: str) -> list[str]:
    """Wheels of ``packages`` for the target Python/platform into ``folder``; returns what failed."""
    folder.mkdir(parents=True, exist_ok=True)
    failed = []
    for package in pinned(packages):
        got = _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                   "--platform", platform, "--implementation", "cp", "-d", str(folder), package)
        if got.returncode:  # no wheel on the index: build one (pure-Python sdists)
            got = _pip("wheel", "-q", "--no-deps", "-w", str(folder), package)
        if got.returncode:
            failed.append(f"{package}: {got.stderr.strip().splitlines()[-1] if got.stderr.strip() else '?'}")
    return failed


def copy_model(name: str, folder: Path) -> Path:
    """A bf16 ``save_pretrained`` copy of the model of ``conf/model/<name>.yaml`` (with its tokenizer)."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from lowrank.runner import models

    model_cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    path, kwargs = models.source(model_cfg)
    config = AutoConfig.from_pretrained(path, **kwargs)
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path, dtype=torch.bfloat16, **kwargs)
    out = folder / name
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path, **kwargs).save_pretrained(out)
    return out


INSTALL = """#!/bin/sh
# Installs the bundle's wheels into the current Python environment, offline: sh {name}/install.sh
D="$(cd "$(dirname "$0")" && pwd)"
exec python -m pip install --no-index --no-deps "$@" "$D"/wheels/*.whl
"""

ENV = """# source this on the node: . {name}/env.sh  (then e.g. python run.py model.pretrained=$LOWRANK_MODELS/minilm)
D="$(cd "$(dirname "${{BASH_SOURCE[0]:-$0}}")" && pwd)"
export LOWRANK_MODELS="$D/models" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
[ -d "$D/data" ] && export LOWRANK_DATA_DIR="$D/data"
# Python's bytecode cache in a writable folder: container images often set PYTHONDONTWRITEBYTECODE (or ship a
# read-only site-packages without it), so every process compiles torch's and transformers' ~2000 modules
# from source again (about 5 s of each run's start on an H200 node).
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="${{PYTHONPYCACHEPREFIX:-${{XDG_CACHE_HOME:-$HOME/.cache}}/lowrank/pycache}}"
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--python-version", default="3.12", help="the node's Python (major.minor)")
    p.add_argument("--platform", default="manylinux2014_x86_64")
    p.add_argument("--models", nargs="*", default=["minilm"], help="conf/model names to copy in bf16")
    p.add_argument("--data", type=Path, default=None, help="a data dir to copy (paths.data_dir)")
    p.add_argument("--no-wheels", action="store_true", help="models and data only")
    p.epilog = "The node runs the repository checkout (run.py, conf/) with these wheels installed."
    args = p.parse_args(argv)
    bundle = args.bundle
    bundle.mkdir(parents=True, exist_ok=True)
    failed = [] if args.no_wheels else download_wheels(bundle / "wheels", RUNNER_PACKAGES, args.python_version,
                                                        args.platform)
    for name in args.models:
        print(f"model {name} -> {copy_model(name, bundle / 'models')}", flush=True)
    if args.data is not None:
        shutil.copytree(args.data, bundle / "data", dirs_exist_ok=True)
    (bundle / "install.sh").write_text(INSTALL.format(name=bundle.name))
    (bundle / "env.sh").write_text(ENV.format(name=bundle.name))
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 2**20
    print(f"{bundle}: {size:.0f} MB; on the node: sh {bundle.name}/install.sh && . {bundle.name}/env.sh")
    for line in failed:
        print(f"not bundled: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
