"""Loading an adapter into a model it does not fit: every case is one line naming what is wrong, and the
model is left exactly as it was (same tensors, same requires_grad flags, not adapted, loadable again)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import lowrank

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def bert(layers=2, hidden=32, seed=0):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
        num_labels=2)).eval()


def ours_dir(path, **kw):
    model = lowrank.adapt(bert(**kw), "lora", targets=["q", "v"], rank=2, alpha=4)
    lowrank.save_adapter(model, path)
    return path


def peft_dir(path, safe=True, use_dora=False, **kw):
    model = peft.get_peft_model(bert(**kw), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                            task_type="SEQ_CLS", use_dora=use_dora))
    model.save_pretrained(path, safe_serialization=safe)
    return path


def truncate(path, name):
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    return path


def retype(path, adapter):
    config = json.loads((path / "adapter_config.json").read_text())
    config["adapter"] = adapter
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


# case id -> (write the adapter into a folder, the loader, the model it is loaded into, words the line must hold)
CASES = {
    "ours-wider": (lambda p: ours_dir(p, hidden=48), lowrank.load_adapter, bert, "saved shape"),
    "ours-extra-layers": (lambda p: ours_dir(p, layers=3), lowrank.load_adapter, bert, "layer.2"),
    "ours-missing-layers": (lambda p: ours_dir(p), lowrank.load_adapter, lambda: bert(layers=3), "layer.2"),
    "ours-as-dora": (lambda p: retype(ours_dir(p), "dora"), lowrank.load_adapter, bert, "magnitude"),
    "ours-truncated": (lambda p: truncate(ours_dir(p), "adapter.safetensors"), lowrank.load_adapter, bert,
                       "adapter.safetensors"),
    "ours-given-peft": (lambda p: peft_dir(p), lowrank.load_adapter, bert, "load_peft"),
    "peft-wider": (lambda p: peft_dir(p, hidden=48), lowrank.load_peft, bert, "saved shape"),
    "peft-narrower": (lambda p: peft_dir(p), lowrank.load_peft, lambda: bert(hidden=64), "saved shape"),
    "peft-extra-layers": (lambda p: peft_dir(p, layers=3), lowrank.load_peft, bert, "layer.2"),
    "peft-missing-layers": (lambda p: peft_dir(p), lowrank.load_peft, lambda: bert(layers=3), "layer.2"),
    "peft-dora-into-lora": (lambda p: peft_dir(p, use_dora=True), lowrank.load_peft, bert, "lora_magnitude_vector"),
    "peft-truncated": (lambda p: truncate(peft_dir(p), "adapter_model.safetensors"), lowrank.load_peft, bert,
                       "adapter_model.safetensors"),
    "peft-pickle": (lambda p: peft_dir(p, safe=False), lowrank.load_peft, bert, "pickle"),
    "peft-given-ours": (lambda p: ours_dir(p), lowrank.load_peft, bert, "load_adapter"),
}


def state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()}, type(model.bert.encoder.layer[0].attention.self.query))


@pytest.mark.parametrize("case", list(CASES))
def test_a_load_that_does_not_fit_is_one_line_and_changes_nothing(tmp_path, monkeypatch, case):
    write, load, make, words = CASES[case]
    folder = write(tmp_path / "adapter")
    if case == "peft-dora-into-lora":  # the config claims plain LoRA; the file still holds DoRA's magnitudes
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))

    def never(*args, **kwargs):
        raise AssertionError("a pickle was unpickled")
    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)

    model = make()
    tensors, flags, kind = state(model)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load(model, folder)
    line = str(error.value)
    assert "\n" not in line and words in line, line
    assert not lowrank.adapted_modules(model) and getattr(model, "lowrank_config", None) is None
    after, after_flags, after_kind = state(model)
    assert after_kind is kind and after_flags == flags
    assert after.keys() == tensors.keys() and all(torch.equal(after[k], v) for k, v in tensors.items())
    # nothing is left half-done: the same model takes a fitting adapter afterwards
    fitting = ours_dir(tmp_path / "fits", layers=len(model.bert.encoder.layer), hidden=model.config.hidden_size)
    assert lowrank.adapted_modules(lowrank.load_adapter(model, fitting))


def test_a_failed_load_rolls_back_in_the_middle(tmp_path):
    """A failure after the layers are wrapped (a shape checked last) still unwraps every one of them."""
    folder = peft_dir(tmp_path / "adapter")
    raw = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(k for k in raw if "layer.1" in k and "lora_B" in k)[-1]
    raw[key] = torch.zeros(raw[key].shape[0] + 1, raw[key].shape[1])
    __import__("safetensors.torch", fromlist=["save_file"]).save_file(raw, str(folder / "adapter_model.safetensors"))
    model = bert()
    with pytest.raises(ValueError, match="saved shape"):
        lowrank.load_peft(model, folder)
    assert not lowrank.adapted_modules(model)
    assert all(p.requires_grad for p in model.parameters())
