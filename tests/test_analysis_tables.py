"""Tables 5-6 from a synthetic sweep table with known means, budget matching, and the writers."""

import numpy as np
import pandas as pd
import pytest

from analysis.tables import (
    PAPER_TABLE5,
    PAPER_TABLE7,
    budget_ranks,
    side_by_side,
    table5,
    table6,
    table7,
    targets_label,
    to_latex,
    to_markdown,
    write_table,
)


def sweep():
    rows = []
    value = {"Wq": 0.70, "Wk": 0.71, "Wv": 0.72, "Wo": 0.73, "Wq,Wk": 0.74, "Wq,Wv": 0.75, "Wq,Wk,Wv,Wo": 0.76}
    targets = {"Wq": '["q"]', "Wk": "[k]", "Wv": ["v"], "Wo": "o", "Wq,Wk": "k,q", "Wq,Wv": '["q", "v"]',
               "Wq,Wk,Wv,Wo": "[q,k,v,o]"}
    for label, t in targets.items():
        n = len(label.split(","))
        for rank in (1, 8 // n, 64):
            for seed, eps in ((0, -0.01), (1, 0.01)):
                for task in ("sst2", "mr"):
                    rows.append({"targets": t, "rank": rank, "seed": seed, "task": task, "status": "completed",
                                 "best/accuracy": value[label] + eps + rank / 1000, "final/loss": 0.3})
    rows.append({"targets": "[q]", "rank": 8, "seed": 2, "task": "sst2", "status": "failed",
                 "best/accuracy": 0.0, "final/loss": np.nan})
    return pd.DataFrame(rows)


def test_targets_labels_in_paper_order():
    assert targets_label(["v", "q"]) == "Wq,Wv"
    assert targets_label('["o", "k", "q", "v"]') == "Wq,Wk,Wv,Wo"
    assert targets_label("[q,v]") == "Wq,Wv" == targets_label("q,v")
    assert budget_ranks(8, ["Wq", "Wq,Wv", "Wq,Wk,Wv,Wo"]) == {"Wq": 8, "Wq,Wv": 4, "Wq,Wk,Wv,Wo": 2}


def test_table5_budget_matched_means_and_stds():
    t = table5(sweep(), "best/accuracy", budget=8)
    assert list(t.columns) == list(PAPER_TABLE5.columns)
    assert t.loc["Rank r"].tolist() == [8, 8, 8, 8, 4, 4, 2]
    # mean over seeds 0/1 = value + rank/1000, in percent; std of ±0.01 over two seeds = 1.41 points
    assert t.loc["sst2", "Wq,Wv"] == "75.4 ± 1.4"
    assert t.loc["mr", "Wq"] == "70.8 ± 1.4"
    num = table5(sweep(), "best/accuracy", budget=8, numeric=True)
    assert num.loc["sst2", "Wq,Wk,Wv,Wo"] == pytest.approx(76.2)
    assert table5(sweep(), "accuracy").attrs["budget"] == 8  # inferred budget, metric by substring


def test_table6_by_rank_excludes_failed_runs():
    t = table6(sweep(), "best/accuracy", numeric=True)
    assert list(t.columns) == ["r=1", "r=2", "r=4", "r=8", "r=64"]
    assert t.loc[("sst2", "Wq"), "r=8"] == pytest.approx(70.8)  # the failed seed-2 run (0.0) is not averaged in
    assert t.loc[("mr", "Wq,Wv"), "r=64"] == pytest.approx(81.4)
    assert np.isnan(t.loc[("sst2", "Wq"), "r=2"])  # never run


def test_missing_columns_and_metrics_name_the_fix():
    with pytest.raises(KeyError, match="targets"):
        table6(sweep().drop(columns="targets"), "best/accuracy")
    with pytest.raises(KeyError, match="pick one of"):
        table6(sweep(), "bleu")
    with pytest.raises(ValueError, match="budget 3"):
        table5(sweep(), "best/accuracy", budget=3)


def test_writers(tmp_path):
    t = table5(sweep(), "best/accuracy", budget=8)
    md = to_markdown(side_by_side(t, PAPER_TABLE5))
    assert md.splitlines()[0].startswith("|  | Weight type | Wq | Wk")
    assert "| paper (GPT-3 175B) | MultiNLI (±0.1%) | 91.00 |" in md
    tex = to_latex(t, caption="Table 5")
    assert r"\toprule" in tex and r"$\pm$" in tex and r"\caption{Table 5}" in tex
    paths = write_table(t, tmp_path / "sub" / "table5")
    assert [p.suffix for p in paths] == [".md", ".tex", ".csv"] and all(p.is_file() for p in paths)
    back = pd.read_csv(paths[2], index_col=0)
    assert back.loc["sst2", "Wq,Wv"] == "75.4 ± 1.4"


def test_table7_layout_from_a_study():
    study = pd.DataFrame([
        {"label": r, "module": "m", "layer": 3, "matrix": "q", "r": r, "delta": d, "own": o, "random": x,
         "random_expected": x, "norm_W": 61.95, "norm_delta": n, "factor": n / d}
        for r, d, o, x, n in ((4, 0.32, 21.67, 0.02, 6.91), (64, 1.90, 37.71, 0.33, 3.57))
    ])
    t = table7(study, layer=3)
    assert list(t.columns) == list(PAPER_TABLE7.columns)
    assert np.allclose(t.iloc[0].to_numpy(float), PAPER_TABLE7.iloc[0].to_numpy(float), equal_nan=True)
    assert t.loc["‖ΔW‖_F", ("r=4", "ΔWq")] == 6.91
    assert t.iloc[3][("r=4", "ΔWq")] == pytest.approx(21.6, abs=0.02)
