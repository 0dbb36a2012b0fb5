"""Figures stage layout: every text a saved figure draws (captions, legend titles and entries, titles, labels) lies
inside the figure's canvas, for one experiment (single-column figures) and two (double-column); every gain heatmap
label inside its own cell; and a pooled heatmap row only where its tasks differ from the pools above it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from test_figures import fomaml_metrics, sft_metrics
from test_stats import SETTINGS, metaloop_rows, synthetic_eval_frame, write_eval_frame
from test_summary import write_calibration

from fomaml_math.analysis import figures, stats, style
from fomaml_math.analysis.calibration import load_calibration
from fomaml_math.analysis.tables import META_TEST_POOL, POOLED, read_table

TOLERANCE_PX = 2.0  # anti-aliasing of a glyph's edge


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    """Stats tables of the synthetic evaluation with all four initialisations (the FOMAML meta-training inner
    loop row too: the widest legend)."""
    tmp = tmp_path_factory.mktemp("layout")
    frame = synthetic_eval_frame()
    paths = write_eval_frame(tmp / "eval", pd.concat([frame, metaloop_rows(frame)], ignore_index=True))
    out = tmp / "stats"
    argv = ["--settings", json.dumps(SETTINGS), "--eval", *map(str, paths), "--output-dir", str(out)]
    assert stats.main(argv) == 0
    tables = {name: read_table(out, f"{name}.tsv") for name in ("accuracy", "comparisons", "rule_adoption")}
    return tables | load_calibration(write_calibration(tmp / "cal"))


def _drawn_texts(fig: Figure, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Text], object]:
    """Draw ``fig`` as save_figure does (its style, the PNG's dpi) and return every non-empty Text drawn, with the
    renderer (a Text that is not drawn, e.g. a tick label outside the axis limits, is not on the canvas)."""
    drawn: dict[int, Text] = {}
    draw = Text.draw

    def recording(self: Text, renderer) -> None:
        if self.get_visible() and self.get_text().strip():
            drawn[id(self)] = self
        draw(self, renderer)

    monkeypatch.setattr(Text, "draw", recording)
    with style.context():
        fig.set_dpi(style.PNG_DPI)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
    monkeypatch.undo()
    return list(drawn.values()), canvas.get_renderer()


def _outside(fig: Figure, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    texts, renderer = _drawn_texts(fig, monkeypatch)
    assert texts, "nothing drawn"
    canvas = fig.bbox
    outside = []
    for text in texts:
        box = text.get_window_extent(renderer)
        if (
            box.x0 < canvas.x0 - TOLERANCE_PX
            or box.y0 < canvas.y0 - TOLERANCE_PX
            or box.x1 > canvas.x1 + TOLERANCE_PX
            or box.y1 > canvas.y1 + TOLERANCE_PX
        ):
            outside.append(f"{text.get_text()!r}: x {box.x0:.0f}..{box.x1:.0f}, y {box.y0:.0f}..{box.y1:.0f}")
    return outside


@pytest.mark.parametrize("experiments", [("heldout_geometry",), ("in_domain", "heldout_geometry")])
def test_every_text_of_every_figure_lies_inside_the_canvas(
    inputs: dict[str, pd.DataFrame], experiments: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    def mine(table: pd.DataFrame) -> pd.DataFrame:
        return table[table["experiment"].isin(experiments)]

    calibration = {name: mine(inputs[name]) for name in ("chosen", "grid", "curve")}
    built = figures.build_figures(
        mine(inputs["accuracy"]),
        mine(inputs["comparisons"]),
        fomaml_metrics(),
        sft_metrics(),
        0.95,
        calibration,
        mine(inputs["rule_adoption"]),
    )
    assert set(built) == set(figures.FIGURES)
    outside = {f"{stem} ({fig.get_size_inches()[0]} in)": _outside(fig, monkeypatch) for stem, fig in built.items()}
    assert {figure: texts for figure, texts in outside.items() if texts} == {}


@pytest.mark.parametrize("experiments", [("heldout_geometry",), ("in_domain", "heldout_geometry")])
def test_every_heatmap_label_lies_inside_its_cell(
    inputs: dict[str, pd.DataFrame], experiments: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The widest labels a cell can get (three stars, +100.0) and the demo's pair of neighbours (-29.4*, -33.3**)
    each inside their own cell at the PNG's size, so no two labels overlap, in the demo's shape: five shot columns
    (25 and 50 are the 10-shot rows again) and a long task name."""
    comparisons = inputs["comparisons"][inputs["comparisons"]["experiment"].isin(experiments)]
    ten = comparisons[comparisons["shots"] == 10]
    comparisons = pd.concat([comparisons, ten.assign(shots=25), ten.assign(shots=50)], ignore_index=True)
    comparisons["task"] = comparisons["task"].replace({"algebra": "intermediate_algebra_v1"})
    shown = (comparisons["experiment"] == experiments[0]) & (comparisons["comparison"] == figures.HEADLINE)
    cycle = [(-0.294, "*"), (-0.333, "**"), (1.0, "***"), (-1.0, "***"), (-0.052, "")]
    values = [cycle[k % len(cycle)] for k in range(int(shown.sum()))]
    comparisons.loc[shown, "acc_diff"] = [value for value, _ in values]
    comparisons.loc[shown, "acc_stars"] = [stars for _, stars in values]
    fig = figures.gain_heatmap_figure(comparisons)
    assert fig.get_size_inches()[0] == style.SINGLE_COLUMN_IN
    texts, renderer = _drawn_texts(fig, monkeypatch)
    cells = {t.get_gid(): t for t in texts if str(t.get_gid()).startswith("cell:")}
    assert len(cells) == shown.sum()
    labels = {t.get_text().replace("\n", "") for t in cells.values()}  # a label may put its stars on a second line
    assert {"-29.4*", "-33.3**", "+100.0***", "-100.0***"} <= labels
    ax = fig.axes[0]
    tasks = [t.get_gid().split(":")[1] for t in cells.values()]
    rows = list(dict.fromkeys(tasks))
    shots = sorted({int(t.get_gid().split(":")[2]) for t in cells.values()})
    outside, boxes = [], []
    for gid, text in cells.items():
        _, task, shot = gid.split(":")
        i, j = rows.index(task), shots.index(int(shot))
        corners = ax.transData.transform([(j - 0.5, i - 0.5), (j + 0.5, i + 0.5)])
        (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
        box = text.get_window_extent(renderer)
        boxes.append(box)
        if box.x0 < x0 or box.x1 > x1 or box.y0 < y0 or box.y1 > y1:
            outside.append(f"{text.get_text()!r} ({gid}): x {box.x0:.0f}..{box.x1:.0f} of {x0:.0f}..{x1:.0f}")
    assert outside == []
    assert not any(a.overlaps(b) for k, a in enumerate(boxes) for b in boxes[k + 1 :])


@pytest.fixture(scope="module")
def held_out_only(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """comparisons.tsv of an experiment evaluated on its meta_test task only (``in_domain_rows: false``): the
    held-out pool and the pool of all tasks cover the same task."""
    tmp = tmp_path_factory.mktemp("held_out_only")
    frame = synthetic_eval_frame()
    frame = frame[(frame["task"] == "geometry") & (frame["experiment"] != "in_domain")]
    paths = write_eval_frame(tmp / "eval", frame)
    argv = ["--settings", json.dumps(SETTINGS), "--eval", *map(str, paths), "--output-dir", str(tmp / "stats")]
    assert stats.main(argv) == 0
    return read_table(tmp / "stats", "comparisons.tsv")


def _heatmap_rows(fig: Figure) -> list[str]:
    (image,) = fig.findobj(lambda artist: artist.get_gid() == "heatmap")
    tasks = [str(t.get_gid()).split(":")[1] for t in fig.findobj(Text) if str(t.get_gid()).startswith("cell:")]
    rows = list(dict.fromkeys(tasks))
    assert len(rows) == image.get_array().shape[0] == len(fig.axes[0].get_yticks())
    return rows


def test_a_pool_with_the_tasks_of_the_pool_above_it_is_one_heatmap_row(
    held_out_only: pd.DataFrame, inputs: dict[str, pd.DataFrame]
) -> None:
    headline = held_out_only[held_out_only["comparison"] == figures.HEADLINE]
    assert set(headline["task"]) == {"geometry", META_TEST_POOL}  # the stats leave the duplicate pool out
    # tables written before they did: the figure still shows the pool once
    older = pd.concat([held_out_only, held_out_only[held_out_only["task"] == META_TEST_POOL].assign(task=POOLED)])
    fig = figures.gain_heatmap_figure(older)
    assert _heatmap_rows(fig) == ["geometry", META_TEST_POOL]
    pooled = headline[headline["task"] == META_TEST_POOL].sort_values("shots")
    (image,) = fig.findobj(lambda artist: artist.get_gid() == "heatmap")
    np.testing.assert_allclose(np.ma.getdata(image.get_array())[1], 100 * pooled["acc_diff"].to_numpy())
    # With in-domain tasks the two pools differ: both rows stay.
    comparisons = inputs["comparisons"][inputs["comparisons"]["experiment"] == "heldout_geometry"]
    rows = ["algebra", "geometry", "number_theory", META_TEST_POOL, POOLED]
    assert _heatmap_rows(figures.gain_heatmap_figure(comparisons)) == rows
