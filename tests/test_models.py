"""Model sources: a GGUF model is read from its cached float copy once that exists, and the copy holds the
weights and tokenizer it was written from."""

from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lowrank.runner import models


def gguf_model(folder, gguf_file="tiny.gguf"):
    return OmegaConf.create({"name": "tiny", "pretrained": str(folder), "gguf_file": gguf_file, "dtype": "float32",
                             "revision": None, "trust_remote_code": False})


def test_a_gguf_model_loads_from_its_copy_once_written(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(b"GGUF")
    cfg = gguf_model(folder)
    assert models.source(cfg) == (str(folder), {"local_files_only": True, "gguf_file": "tiny.gguf"})
    copy = models.gguf_copy(cfg)
    assert copy.parent == tmp_path / "cache" / "gguf" and copy.name.startswith("tiny-")
    copy.mkdir(parents=True)
    assert models.source(cfg) == (str(copy), {"local_files_only": True})
    os.utime(folder / "tiny.gguf", ns=(1, 1))  # another file under the same name: another copy
    assert models.gguf_copy(cfg) != copy and models.source(cfg)[0] == str(folder)
    packed = models.gguf_copy(cfg)
    packed.with_name(packed.name + ".packed").touch()  # transformers kept the blocks packed: no float copy
    assert models.gguf_copy(cfg) is None and models.source(cfg)[0] == str(folder)
    monkeypatch.setenv("LOWRANK_CACHE_DIR", "off")
    assert models.gguf_copy(cfg) is None and models.source(cfg)[0] == str(folder)
    assert models.gguf_copy(gguf_model(folder, gguf_file=None)) is None


def test_the_copy_holds_the_source_weights_and_tokenizer(tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    # the tiny LLaMA folder stands in for a GGUF file: what transformers converts is what the copy must hold
    cfg = gguf_model(tiny_llama)
    monkeypatch.setattr(models, "_original", lambda model_cfg: (str(tiny_llama), {"local_files_only": True}))
    copy = tmp_path / "gguf" / "tiny-0"
    models._write_gguf_copy(cfg, copy)
    models._write_gguf_copy(cfg, copy)  # a second job converting at the same time: the first copy stays
    assert sorted(p.name for p in copy.parent.iterdir()) == ["tiny-0"]
    source = load_file(str(tiny_llama / "model.safetensors"))
    saved = load_file(str(copy / "model.safetensors"))
    assert source.keys() == saved.keys()
    assert all(torch.equal(source[k], saved[k]) for k in source)
    text = ["name[Aromi], food[Chinese]", "a riverside place"]
    assert AutoTokenizer.from_pretrained(copy)(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_llama)(text)["input_ids"]
