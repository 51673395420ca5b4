"""Training options of the DoRA paper's setting: weight decay on the magnitude, checkpoints at fractions of
training, and a head-first linear probe."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import lowrank  # noqa: E402
from lowrank.runner import train  # noqa: E402
from lowrank.runner.data import TaskData  # noqa: E402


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg)


def test_magnitude_decay_group():
    model = lowrank.adapt(_tiny_bert(), "dora", targets=["q", "v"], rank=2)
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(opt):
        return {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}

    default = decayed(train.make_optimizer(model, 1e-3, 0.01, (0.9, 0.999)))
    paper = decayed(train.make_optimizer(model, 1e-3, 0.01, (0.9, 0.999), decay_magnitude=True))
    magnitudes = {n for n in names.values() if n.endswith("magnitude")}
    assert len(magnitudes) == 4 and not magnitudes & default and paper == default | magnitudes
    assert not any(n.endswith("bias") for n in paper)  # biases never decay


def test_fraction_steps():
    assert train.fraction_steps([0, 0.25, 0.5, 0.75, 1.0], 200) == {0, 50, 100, 150, 200}
    assert train.fraction_steps([1 / 3], 10) == {3}


def test_head_first_probe_trains_only_the_head():
    from types import SimpleNamespace

    model = lowrank.adapt(_tiny_bert(), "lora", targets=["q", "v"], rank=2)
    with torch.no_grad():
        for layer in lowrank.adapted_modules(model).values():
            layer.lora_B.normal_()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 50, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist(),
             "labels": i % 2} for i in range(64)]
    data = TaskData(kind="classification", train=datasets.Dataset.from_list(rows), eval=None, pad_id=0)
    cfg = SimpleNamespace(head_first_steps=5, head_first_lr=1e-2, betas=[0.9, 0.999], group_by_length=False,
                          batch_size=8, precision="fp32", label_smoothing=0.0)
    train.probe_head(model, data, cfg, torch.device("cpu"), seed=0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # restored


def test_fractions_alone_keep_the_full_fine_tuning_trajectory():
    from omegaconf import OmegaConf

    from lowrank.runner.app import weight_modules

    cfg = OmegaConf.create({"targets": ["q", "v"], "layers": None,
                            "trainer": {"save_weights_at": [], "save_weights_every": 0, "save_weights_at_fractions": [0.5]}})
    import lowrank

    model = lowrank.adapt(_tiny_bert(), "full")
    names = weight_modules(model, cfg)  # full fine-tuning: no adapted modules, the targets' own weights
    assert len(names) == 4 and all(n.endswith(("query", "value")) for n in names)
