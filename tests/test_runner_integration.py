"""The packaged models on the real data (marked integration; ~2 min together on a 2-core CPU):
MiniLM + SST-2 learns with LoRA, and SmolLM2 (GGUF) + E2E writes generations and BLEU."""

from __future__ import annotations

import json

import pytest

from conftest import DATA_DIR, run_cli

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (DATA_DIR / "sst2").is_dir(), reason=f"no data at {DATA_DIR}")]

# all-MiniLM-L6-v2: 22,713,216 parameters (BertModel incl. pooler); a 2-class head adds 384·2 + 2.
MINILM_BASE, MINILM_HEAD = 22_713_216, 384 * 2 + 2
MINILM_LORA_QV_R8 = 6 * 2 * 8 * (384 + 384)   # 6 layers × {q, v} × r·(in + out)


def test_minilm_lora_learns_sst2(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("trainer=smoke", "logger=none", "trainer.max_steps=50", "trainer.batch_size=32", "trainer.lr=3e-3",
                   "trainer.max_seq_len=48", "trainer.eval_every=50", "trainer.max_eval_samples=256",
                   "trainer.save_weights_at=[]", f"hydra.run.dir={out}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["trainable_params"] == MINILM_LORA_QV_R8 + MINILM_HEAD == 74_498
    assert result["total_params"] == MINILM_BASE + MINILM_HEAD + MINILM_LORA_QV_R8
    # a fresh head on the frozen encoder starts near chance (~50%); 50 LoRA steps must move well past it
    # (measured: 0.82 on these 256 dev sentences)
    assert result["final"]["eval/accuracy"] >= 0.75, result["final"]


def test_smollm2_e2e_writes_generations_and_bleu(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("model=smollm2", "task=e2e", "trainer=smoke", "logger=none", "trainer.batch_size=4",
                   "trainer.max_seq_len=64", "trainer.max_eval_samples=4", "trainer.eval_every=6",
                   "trainer.save_weights_at=[]", "trainer.lr=2e-4", "task.generation.max_new_tokens=24",
                   f"hydra.run.dir={out}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["metric"] == "eval/bleu"
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4 and all(g["prediction"] for g in generations)
    import sacrebleu

    refs = [g["references"] for g in generations]
    width = max(map(len, refs))
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    assert result["final"]["eval/bleu"] == pytest.approx(
        sacrebleu.corpus_bleu([g["prediction"] for g in generations], streams).score, abs=1e-9)
    # SmolLM2 (LLaMA family), r=8 on q (576→576) and v (576→192, grouped-query) in 30 layers; no head
    assert result["trainable_params"] == 30 * (8 * (576 + 576) + 8 * (576 + 192))
