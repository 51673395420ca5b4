"""The papers' reference numbers and the settings they came from (LoRA arXiv 2106.09685, DoRA arXiv 2402.09353, FLoRA arXiv 2405.14739).

Plain data: recipes put these beside our numbers. Every entry names its source table or figure and the
model it was measured on, because our default reproduces the *analysis* on a much smaller model.
"""

from __future__ import annotations

LORA_TABLE5 = {
    "source": "LoRA Table 5 (Hu et al. 2021), GPT-3 175B, 18M trainable parameters, validation accuracy",
    "columns": ["Wq", "Wk", "Wv", "Wo", "Wq,Wk", "Wq,Wv", "Wq,Wk,Wv,Wo"],
    "rank": [8, 8, 8, 8, 4, 4, 2],
    "rows": {
        "WikiSQL": [70.4, 70.0, 73.0, 73.2, 71.4, 73.7, 73.7],
        "MultiNLI": [91.0, 90.8, 91.0, 91.3, 91.3, 91.3, 91.7],
    },
    "claim": "adapting Wq and Wv together is best overall; more matrices at small rank beat one matrix at large rank",
}

LORA_TABLE6 = {
    "source": "LoRA Table 6, GPT-3 175B, validation accuracy by rank r",
    "ranks": [1, 2, 4, 8, 64],
    "rows": {
        ("WikiSQL", "Wq"): [68.8, 69.6, 70.5, 70.4, 70.0],
        ("WikiSQL", "Wq,Wv"): [73.4, 73.3, 73.7, 73.8, 73.5],
        ("WikiSQL", "Wq,Wk,Wv,Wo"): [74.1, 73.7, 74.0, 74.0, 73.9],
        ("MultiNLI", "Wq"): [90.7, 90.9, 91.1, 90.7, 90.7],
        ("MultiNLI", "Wq,Wv"): [91.3, 91.4, 91.3, 91.6, 91.4],
        ("MultiNLI", "Wq,Wk,Wv,Wo"): [91.2, 91.7, 91.7, 91.5, 91.4],
    },
    "claim": "a rank as small as one suffices for Wq,Wv; Wq alone needs a larger r",
}

LORA_FIG3 = {
    "source": "LoRA Figure 3, GPT-3 175B layer 48 of 96, φ(A_r=8, A_r=64, i, j)",
    "claim": "the top direction of A_r=8 and A_r=64 overlaps with φ(1, 1) > 0.5 for both ΔWq and ΔWv",
    "threshold": 0.5,
}

LORA_FIG6_7 = {
    "source": "LoRA Appendix H.1, Figures 6-7, GPT-3 175B layers 1, 32, 64, 96: Figure 3 (r=8 vs r=64) and "
              "Figure 4 (two seeds at r=64) per layer",
    "claim": "the results of Figures 3-4 generalize to other layers: the top r=8 direction lies in the r=64 "
             "subspace (φ(1, 1) > 0.5) and seeds share directions above chance",
    "threshold": 0.5,
}

LORA_FIG4 = {
    "source": "LoRA Figure 4, GPT-3 175B layer 48, two random seeds at r=64, plus two random Gaussian matrices",
    "claim": "seeds share top directions (ΔWq more than ΔWv); random Gaussian matrices share none "
             "(chance level ≈ max(i, j)/d)",
}

LORA_FIG8 = {
    "source": "LoRA Figure 8, GPT-3 175B layer 48, φ(Wq's top-i right singular directions, A_r, i, j)",
    "claim": "ΔW does not contain W's top singular directions: similarity with W's top 10% barely exceeds 0.2",
    "threshold": 0.2,
}

LORA_TABLE7 = {
    "source": "LoRA Table 7 / App. H.4, GPT-3 175B, Wq of layer 48 (d = 12288)",
    "d": 12288,
    "norm_W": 61.95,
    "rows": {
        4: {"delta": 0.32, "own": 21.67, "random": 0.02, "norm_delta": 6.91, "factor": 21.5},
        64: {"delta": 1.90, "own": 37.71, "random": 0.33, "norm_delta": 3.57, "factor": 1.88},
    },
    "claims": [
        "ΔW correlates with W more than a random matrix does (delta > random)",
        "ΔW amplifies directions not emphasised in W (delta << own)",
        "the amplification factor is large at small r and falls as r grows (≈ 21.5 at r=4, ≈ 2 at r=64)",
    ],
}

DORA_FIG2 = {
    "source": "DoRA Figure 2, VL-BART query matrices over 4 checkpoints; correlation of ΔD and ΔM",
    "correlation": {"full": -0.62, "dora": -0.31, "lora": 0.83},
    "claim": "LoRA's ΔM and ΔD move together (positive slope); FT and DoRA show a negative slope",
    # the figure's ΔD axis ranges (VL-BART, Wq; read off DoRA Fig. 2)
    "delta_d_range": {"full": (0.014, 0.022), "lora": (0.10, 0.16), "dora": (0.16, 0.32)},
}

FLORA_PARAMS = {
    "source": "FLoRA (Si et al. 2024) Tucker parameterisation; worked example (k=3, 256→512, r=32): r1r2r3r4 + d_in r1 + d_out r2 + k r3 + k r4",
    "conv_example": {"flora": 28_684, "lora_loralib": 221_184, "lora_reshape_out_by_in_k2": 90_112,
                     "lora_reshape_outk_by_ink": 73_728},
    "linear_example": {"flora": 25_600, "lora": 24_576},
    "claim": "on convolutions FLoRA needs far fewer parameters than LoRA at the same rank "
             "(≈ 80% fewer); on linear layers slightly more",
}

FLORA_VISION = {
    "source": "FLoRA (Si et al. 2024, arXiv 2405.14739) Table 1: ConvNeXt, FLoRA vs LoRA/DoRA at several parameter "
              "budgets (its numbers are not reproduced here; the claims are)",
    "claims": ["comparable to full fine-tuning with an 80% smaller parameter budget",
               "outperforms LoRA and DoRA across parameter budgets on convolutions"],
}

FLORA_SCALE = {
    "source": "FLoRA (Si et al. 2024, arXiv 2405.14739): s = 4 on ConvNeXt convolutions (official example), "
              "s = 0.04 on InternViT-6B / LLaVA linear layers",
    "claim": "the best scale s is large on convolutions and small on linear layers",
}
