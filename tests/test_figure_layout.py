"""Figures stage layout: every text a saved figure draws (captions, legend titles and entries, titles, labels) lies
inside the figure's canvas, for one experiment (single-column figures) and two (double-column)."""

from __future__ import annotations

import json

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
from fomaml_math.analysis.tables import read_table

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
