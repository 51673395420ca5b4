"""Task data: the local readers (Latin-1, \\x85, TSV, CSV), the fixed split, tokenisation and padding on a
tiny data dir; and, marked integration, every local task's counts as its SOURCE.md states them."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hydra import compose, initialize_config_dir

from lowrank.runner import data
from lowrank.runner.config import CONF_DIR, ConfigError

from conftest import DATA_DIR


def task(name: str, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"task={name}", *overrides]).task


def test_latin1_lines_keep_x85_inside_a_sentence(tiny_data):
    raw = data.read_local(task("mr"), tiny_data)
    texts = list(raw["train"]["text"]) + list(raw["eval"]["text"])
    assert len(texts) == 40, "\\x85 must not split a line"
    assert "café and crème , hmm\x85 superb" in texts


def test_fixed_split_is_seeded_disjoint_and_complete():
    train_a, eval_a = data.fixed_split(103, 0.1, seed=1234)
    train_b, eval_b = data.fixed_split(103, 0.1, seed=1234)
    assert (train_a == train_b).all() and (eval_a == eval_b).all()
    assert len(eval_a) == 11 and sorted(set(train_a) | set(eval_a)) == list(range(103))
    assert not set(train_a) & set(eval_a)
    assert list(data.fixed_split(103, 0.1, seed=1)[1]) != list(eval_a)


def test_split_does_not_depend_on_the_run_seed(tiny_data):
    a = data.read_local(task("mr"), tiny_data)
    b = data.read_local(task("mr", "seed=5"), tiny_data)
    assert list(a["eval"]["text"]) == list(b["eval"]["text"]) and len(a["eval"]) == 4


def test_bad_label_line_is_one_clear_error(tmp_path):
    (tmp_path / "f.txt").write_text("1 fine\nnot-a-label text\n")
    with pytest.raises(ConfigError, match=r"f.txt:2: label .not-a-label. is not an integer; fix:"):
        data.read_label_text(tmp_path / "f.txt")


def test_e2e_references_are_grouped_per_meaning_representation(tiny_data):
    raw = data.read_local(task("e2e"), tiny_data)
    assert len(raw["train"]) == 24 and set(raw["train"].column_names) == {"mr", "ref"}
    assert list(raw["eval"]["mr"])[:2] == ["name[Aromi], food[Chinese]", "name[Blue Spice], area[riverside]"]
    assert [len(r) for r in raw["eval"]["refs"]] == [2, 1, 2, 1]


def test_classification_tokens_and_padding(tiny_data, tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert, local_files_only=True)
    td = data.load(task("sst2"), tok, data_dir=tiny_data, max_seq_len=5, max_eval_samples=10)
    assert len(td.train) == 256 and len(td.eval) == 10
    assert max(len(x) for x in td.train["input_ids"]) == 5, "truncated at max_seq_len"
    batch = data.collate(td.train[[0, 1]], td.pad_id, "classification")
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["labels"].tolist() == [0, 1]
    short = data.collate({"input_ids": [[5, 6, 7], [8]], "labels": [1, 0]}, 0, "classification")
    assert short["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert short["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = data.left_pad([[5, 6, 7], [8]], 0)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"].tolist()[1] == [0, 0, 1]


def test_generation_labels_mask_the_prompt(tiny_data, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama, local_files_only=True)
    t = task("e2e")
    td = data.load(t, tok, data_dir=tiny_data, max_seq_len=64)
    prompt = tok(t.prompt.format(mr="name[Aromi], food[Chinese]"))["input_ids"]
    ids, labels = td.train[0]["input_ids"], td.train[0]["labels"]
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [data.IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[len(prompt):-1]).strip() == "aromi serves chinese food."  # MiniLM's tokenizer lower-cases
    assert td.prompts[0] == prompt and td.references[0] == ["Aromi serves Chinese food.", "Chinese food is served at Aromi."]
    batch = data.collate(td.train[[0, 1]], td.pad_id, "generation")
    assert (batch["labels"][batch["attention_mask"] == 0] == data.IGNORE).all()


# ---- the real data (../shared/data): counts from each folder's SOURCE.md ---------------------------------

REAL = pytest.mark.skipif(not (DATA_DIR / "sst2").is_dir(), reason=f"no data at {DATA_DIR}; set LOWRANK_DATA_DIR")

COUNTS = {  # task: ({split: rows}, Counter of labels over all rows or None)
    "sst2": ({"train": 6920, "eval": 872, "test": 1821}, None),
    "sst5": ({"train": 8544, "eval": 1101, "test": 2210}, None),
    "mr": ({"train": 9595, "eval": 1067}, {0: 5331, 1: 5331}),
    "trec": ({"train": 5452, "eval": 500}, None),
    "subj": ({"train": 9000, "eval": 1000}, {0: 5000, 1: 5000}),
    "cr": ({"train": 3397, "eval": 378}, {1: 2407, 0: 1368}),
    "mpqa": ({"train": 9545, "eval": 1061}, {1: 3312, 0: 7294}),
    "cola": ({"train": 8551, "eval": 527, "test": 516}, None),
}


@pytest.mark.integration
@REAL
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_real_task_counts(name):
    raw = data.load_raw(task(name), DATA_DIR)
    sizes, labels = COUNTS[name]
    assert {split: len(ds) for split, ds in raw.items()} == sizes
    if labels is not None:
        assert Counter(list(raw["train"]["label"]) + list(raw["eval"]["label"])) == labels
    assert all(isinstance(t, str) and t for t in raw["train"]["text"][:100])


@pytest.mark.integration
@REAL
def test_real_label_balance_and_encodings():
    sst2 = data.load_raw(task("sst2"), DATA_DIR)
    assert Counter(sst2["train"]["label"]) == {1: 3610, 0: 3310} and Counter(sst2["eval"]["label"]) == {1: 444, 0: 428}
    cola = data.load_raw(task("cola"), DATA_DIR)
    assert Counter(cola["train"]["label"]) == {1: 6023, 0: 2528} and Counter(cola["eval"]["label"]) == {1: 365, 0: 162}
    assert set(data.load_raw(task("trec"), DATA_DIR)["train"]["label"]) == set(range(6))
    assert set(data.load_raw(task("sst5"), DATA_DIR)["train"]["label"]) == set(range(5))
    mr = data.load_raw(task("mr"), DATA_DIR)
    texts = list(mr["train"]["text"]) + list(mr["eval"]["text"])
    assert any("amélie" in t for t in texts) and not any("\ufffd" in t for t in texts)


@pytest.mark.integration
@REAL
def test_real_e2e_trains_on_dev_and_evaluates_on_test():
    raw = data.load_raw(task("e2e"), DATA_DIR)
    assert len(raw["train"]) == 4299 and len(raw["eval"]) == 1847
    assert sum(len(r) for r in raw["eval"]["refs"]) == 4693
