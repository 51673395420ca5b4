"""The figures follow the paper's layouts: tick positions, orientation (i = 1 on top), colour-bar ranges,
panel titles; `save` writes PNG and PDF."""

import numpy as np
import pandas as pd
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from analysis import figures  # noqa: E402


def _images(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


def test_paper_ticks_rule_reproduces_the_papers_labels():
    assert figures.paper_ticks(64, figure="fig3") == [1, 6, 12, 18, 23, 29, 35, 40, 46, 52, 58]
    # the paper's labels are floor(linspace(1, last, count)): the same rule gives Fig. 3's and Fig. 4's
    assert np.floor(np.linspace(1, 58, 11)).astype(int).tolist() == figures.paper_ticks(64, figure="fig3")
    assert np.floor(np.linspace(1, 59, 13)).astype(int).tolist() == figures.paper_ticks(64, figure="fig4")
    assert figures.paper_ticks(8) == list(range(1, 9))
    t = figures.paper_ticks(100, count=11)
    assert t[0] == 1 and t[-1] == 100 and len(t) == 11


def test_figure3_layout():
    rng = np.random.default_rng(0)
    phi_q, phi_v = rng.random((8, 64)), rng.random((8, 64))
    fig = figures.figure3(phi_q, phi_v, layer=3)
    ims = _images(fig)
    assert len(ims) == 4 and all(im.get_clim() == (0, 1) for im in ims)
    ax = ims[0].axes
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # y grows downwards: i = 1 is the top row
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(t) for t in figures.paper_ticks(64, figure="fig3")]
    assert ax.get_xlabel() == "j" and ax.get_ylabel() == "i"
    assert ims[2].get_array().shape == (8, 8)  # the zoom on i, j <= 8
    assert np.array_equal(ims[2].get_array(), phi_q[:8, :8])
    assert "r=8" in fig._suptitle.get_text() and "r=64" in fig._suptitle.get_text()
    cbar = [a for a in fig.axes if a not in [im.axes for im in ims]]
    assert len(cbar) == 1 and cbar[0].get_ylim() == pytest.approx((0.0, 1.0))


def test_colour_bar_ranges_follow_the_paper():
    rng = np.random.default_rng(1)
    p64 = rng.random((64, 64)) * 0.5
    assert {im.get_clim() for im in _images(figures.figure4(p64, p64, p64))} == {(0, 0.5)}
    assert {im.get_clim() for im in _images(figures.figure7({0: (p64, p64), 5: (p64, p64)}))} == {(0, 0.8)}
    assert {im.get_clim() for im in _images(figures.figure6({0: (p64[:8], p64[:8])}))} == {(0, 1)}
    f8 = figures.figure8({"r=8": rng.random((40, 8)), "r=64": rng.random((40, 64)), "rand": rng.random((40, 64))})
    assert {im.get_clim() for im in _images(f8)} == {(0.1, 0.2)}
    titles = [im.axes.get_title() for im in _images(figures.figure4(p64, p64, p64))]
    assert titles[2] == "Random Gaussian"


def test_dora_figure2_and_table7_plot(tmp_path):
    rng = np.random.default_rng(2)
    rows = []
    for method, sign in (("FT", -1), ("LoRA", 1), ("DoRA", -1)):
        for step in (75, 150, 225, 300):
            for layer in range(6):
                x = step / 1000 + 0.01 * rng.random()
                rows.append({"method": method, "step": step, "layer": layer, "matrix": "q", "dD": x,
                             "dM": 1 + sign * x})
    fig = figures.dora_figure2(pd.DataFrame(rows))
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["(a) FT", "(b) LoRA", "(c) DoRA"]
    assert all(len(a.get_lines()) == 1 for a in panels)  # one regression line per panel
    assert "r = +1.00" in [t.get_text().splitlines()[0] for t in panels[1].texts]
    study = pd.DataFrame([{"label": r, "layer": L, "matrix": m, "r": r, "delta": 1.0, "own": 20.0, "random": 0.1,
                           "random_expected": 0.1, "norm_W": 60.0, "norm_delta": 5.0, "factor": 5.0}
                          for r in (8, 64) for L in range(4) for m in "qv"])
    paths = figures.save(figures.table7_plot(study), tmp_path / "t7")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)
