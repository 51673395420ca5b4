"""lowrank.runner.graphs: a training step replayed as a CUDA graph per batch shape gives the eager step's
adapter, with gradient accumulation, with shapes that alternate and around blocks compiled by inductor (GPU
only, except the device check)."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.runner.graphs import GraphedStep

transformers = pytest.importorskip("transformers")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_graphs_refuse_the_cpu():
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(lambda batch: torch.zeros(()), [], torch.device("cpu"))


def _train(graphed: bool, widths, accum: int, seed: int = 0, dropout: float = 0.0):
    """AdamW on a tiny BERT with LoRA on q,v: the trained adapter and the per-step losses."""
    from transformers import BertConfig, BertForSequenceClassification

    device = torch.device("cuda")
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=97, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, num_labels=2)
    model = BertForSequenceClassification(cfg)
    lowrank.adapt(model, "lora", targets=["q", "v"], rank=2, dropout=dropout)
    model.classifier.requires_grad_(True)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)

    def micro(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"]) / accum
        loss.backward()
        return loss.detach()

    run = GraphedStep(micro, params, device) if graphed else micro
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for width in widths:
        total = 0.0
        for _ in range(accum):
            lengths = torch.randint(2, width + 1, (4,), generator=gen)
            ids = torch.randint(1, 97, (4, width), generator=gen)
            mask = (torch.arange(width)[None] < lengths[:, None]).long()
            batch = {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device),
                     "labels": torch.randint(0, 2, (4,), generator=gen).to(device)}
            total = total + run(batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graphed)
        losses.append(total)
    return [p.detach().cpu() for p in params], torch.stack(losses).cpu()


@cuda
@pytest.mark.parametrize("accum", [1, 2])
def test_graphed_steps_equal_eager_steps(accum):
    widths = [8, 16, 8, 8, 16, 24, 8, 16]
    eager_params, eager_losses = _train(False, widths, accum)
    graph_params, graph_losses = _train(True, widths, accum)
    torch.testing.assert_close(graph_losses, eager_losses, atol=1e-5, rtol=1e-5)
    for g, e in zip(graph_params, eager_params):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


@cuda
def test_graphed_dropout_is_seeded():
    widths = [8, 16, 8, 16]
    first, second = _train(True, widths, 1, dropout=0.1), _train(True, widths, 1, dropout=0.1)
    torch.testing.assert_close(first[1], second[1], atol=0, rtol=0)
    no_dropout = _train(True, widths, 1)
    assert not torch.equal(first[1], no_dropout[1])  # dropout is live inside the graph


def _train_llama(mode: str, widths):
    """AdamW on a tiny LLaMA with LoRA on q,k,v,o through the fused causal-LM loss: eager, or the blocks compiled
    by inductor and the whole micro-batch replayed as one CUDA graph (trainer.compile=inductor+whole-graph)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank.runner import accel

    device = torch.device("cuda")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    lowrank.adapt(model, "lora", targets=["q", "k", "v", "o"], rank=2)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "inductor+whole-graph":
        accel.compile(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)

    def micro(batch):
        loss = accel.causal_lm_loss(model, batch["input_ids"], batch["labels"])
        loss.backward()
        return loss.detach()

    graphed = mode != "eager"
    run = GraphedStep(micro, params, device) if graphed else micro
    gen = torch.Generator().manual_seed(1)
    losses = []
    for width in widths:
        ids = torch.randint(1, 97, (4, width), generator=gen)
        labels = ids.clone()
        labels[:, : width // 2] = -100
        losses.append(run({"input_ids": ids.to(device), "labels": labels.to(device)}))
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graphed)
    return [p.detach().cpu() for p in params], torch.stack(losses).cpu()


@cuda
def test_compiled_blocks_in_a_whole_step_graph_equal_eager_steps():
    widths = [16, 32, 16, 16, 32]
    eager_params, eager_losses = _train_llama("eager", widths)
    graph_params, graph_losses = _train_llama("inductor+whole-graph", widths)
    torch.testing.assert_close(graph_losses, eager_losses, atol=1e-4, rtol=1e-4)
    for g, e in zip(graph_params, eager_params):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-3)
