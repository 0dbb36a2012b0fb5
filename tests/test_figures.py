"""Figures stage: files exist, and the data read back from each Figure equals the stats tables."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from test_stats import SEEDS, SETTINGS, SHOTS, TASK_SIZES, run_stats
from test_summary import write_calibration

from fomaml_math.analysis import figures, style
from fomaml_math.analysis.calibration import load_calibration
from fomaml_math.analysis.tables import read_table
from fomaml_math.errors import ConfigError


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_stats(tmp_path_factory.mktemp("figures"))


@pytest.fixture(scope="module")
def tables(stats_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return read_table(stats_dir, "accuracy.tsv"), read_table(stats_dir, "comparisons.tsv")


def fomaml_metrics(steps: int = 120) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    step = np.arange(1, steps + 1)
    frame = pd.DataFrame(
        {
            "step": step,
            "meta/loss": 2.0 * np.exp(-step / 40) + 0.5 + rng.normal(0, 0.05, steps),
            "meta/avg_support_loss": 2.0 * np.exp(-step / 40) + 0.6,
            "meta/avg_query_loss": 2.0 * np.exp(-step / 40) + 0.5,
            "meta/avg_adaptation_gap": rng.normal(-0.1, 0.02, steps),
            "meta/grad_norm": rng.gamma(2.0, 1.0, steps),
            "lr": 1e-4,
        }
    )
    every = step % 20 == 0
    # The names training.monitor.heldout_losses logs.
    frame["heldout/loss_before"] = np.where(every, 2.0 * np.exp(-step / 40) + 0.7, np.nan)
    frame["heldout/loss_after"] = np.where(every, 2.0 * np.exp(-step / 40) + 0.6, np.nan)
    return frame


def sft_metrics(steps: int = 30) -> pd.DataFrame:
    # No sft/grad_norm column: an optional metric that was not logged.
    step = np.arange(1, steps + 1)
    frame = pd.DataFrame({"step": step, "sft/loss": 1.5 * np.exp(-step / 10) + 0.6, "lr": 3e-5})
    frame["heldout/loss_before"] = np.where(step % 10 == 0, 1.0, np.nan)
    return frame


def by_gid(fig: Figure, gid: str) -> list:
    return fig.findobj(lambda artist: artist.get_gid() == gid)


def test_stage_writes_pdf_and_png_for_every_figure(tmp_path: Path, stats_dir: Path) -> None:
    fomaml_csv, sft_csv = tmp_path / "fomaml.csv", tmp_path / "sft.csv"
    fomaml_metrics().to_csv(fomaml_csv, index=False)
    sft_metrics().to_csv(sft_csv, index=False)
    out = tmp_path / "figures"
    argv = ["--settings", json.dumps(SETTINGS), "--stats-dir", str(stats_dir)]
    argv += ["--fomaml-metrics", str(fomaml_csv), "--sft-metrics", str(sft_csv), "--output-dir", str(out)]
    argv += ["--calibration", *map(str, write_calibration(tmp_path / "cal"))]
    assert figures.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(figures.OUTPUT_FILES)
    for stem in figures.FIGURES:
        assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
        png = (out / f"{stem}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
        width = struct.unpack(">I", png[16:20])[0]  # IHDR width: the figure width at 200 dpi
        # Two experiments: the pooled figures have a panel each (double column).
        expected = style.SINGLE_COLUMN_IN if stem == "gain_heatmap" else None
        assert width == round((expected or style.DOUBLE_COLUMN_IN) * style.PNG_DPI)


def _panel(fig: Figure, experiment: str):
    (ax,) = [ax for ax in fig.axes if ax.get_gid() == f"experiment:{experiment}"]
    return ax


def _lines(ax) -> dict:
    return {line.get_gid(): line for line in ax.get_lines()}


def test_accuracy_vs_shots_reads_back_as_the_primary_pool_per_experiment(
    tables: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    accuracy, comparisons = tables
    fig = figures.accuracy_vs_shots_figure(accuracy, comparisons, 0.95)
    for experiment, pool in (("in_domain", "all"), ("heldout_geometry", "meta_test")):
        lines = _lines(_panel(fig, experiment))
        rows = accuracy[(accuracy.experiment == experiment) & (accuracy.task == pool)]
        for init in ("base", "sft", "fomaml"):
            mean = rows[(rows.init == init) & (rows.train_seed == "all")].sort_values("shots")
            np.testing.assert_array_equal(lines[f"acc:{init}"].get_xdata(), mean.shots)
            np.testing.assert_allclose(lines[f"acc:{init}"].get_ydata(), 100 * mean.accuracy)
            assert lines[f"acc:{init}"].get_color() == style.INIT_STYLE[init]["color"]
            # One thin line per training seed beside the mean (base: one untrained model, no seed lines).
            seeds = [g for g in lines if g.startswith(f"acc:{init}:seed:")]
            assert len(seeds) == (0 if init == "base" else len(SEEDS))
            for seed in seeds:
                per_seed = rows[(rows.init == init) & (rows.train_seed == seed.rsplit(":", 1)[1])].sort_values("shots")
                np.testing.assert_allclose(lines[seed].get_ydata(), 100 * per_seed.accuracy)
                assert lines[seed].get_linewidth() < lines[f"acc:{init}"].get_linewidth()
        marks = comparisons[
            (comparisons.experiment == experiment)
            & (comparisons.task == pool)
            & (comparisons.comparison == "fomaml-sft")
        ]
        texts = {a.get_gid(): a.get_text() for a in _panel(fig, experiment).texts}
        for row in marks.itertuples():
            assert texts.get(f"sig:{row.shots}", "") == row.acc_stars


def test_significance_marks_follow_the_comparisons_table(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    accuracy, comparisons = tables
    marked = comparisons.copy()
    selected = (marked.experiment == "in_domain") & (marked.task == "all") & (marked.comparison == "fomaml-sft")
    marked.loc[selected, "acc_stars"] = ["", "*", "***"]
    fig = figures.accuracy_vs_shots_figure(accuracy, marked, 0.95)
    ax = _panel(fig, "in_domain")
    assert [t.get_text() for s in SHOTS for t in ax.texts if t.get_gid() == f"sig:{s}"] == ["*", "***"]
    (mark,) = [t for t in ax.texts if t.get_gid() == "sig:10"]
    at_10 = accuracy[
        (accuracy.experiment == "in_domain")
        & (accuracy.task == "all")
        & (accuracy.shots == 10)
        & (accuracy.train_seed == "all")
    ]
    top = at_10[at_10.init.isin(["fomaml", "sft"])].accuracy_ci_high.max()
    assert mark.xy == pytest.approx((10, 100 * top))


def test_by_task_panels_read_back_as_the_task_rows(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    accuracy, comparisons = tables
    fig = figures.accuracy_vs_shots_by_task_figure(accuracy, comparisons, 0.95)
    panels = {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}
    assert set(panels) == {f"task:{t}" for t in TASK_SIZES}
    for task in TASK_SIZES:
        lines = {line.get_gid(): line for line in panels[f"task:{task}"].get_lines()}
        for init in ("base", "sft", "fomaml"):
            rows = accuracy[
                (accuracy.experiment == "in_domain")
                & (accuracy.task == task)
                & (accuracy.init == init)
                & (accuracy.train_seed == "all")
            ].sort_values("shots")
            np.testing.assert_allclose(lines[f"acc:{init}"].get_ydata(), 100 * rows.accuracy)


def test_gain_heatmap_reads_back_as_the_differences(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    _, comparisons = tables
    fig = figures.gain_heatmap_figure(comparisons)
    (image,) = by_gid(fig, "heatmap")
    rows = comparisons[(comparisons.comparison == "fomaml-sft") & (comparisons.experiment == "in_domain")]
    tasks = [*TASK_SIZES, "all"]
    expected = rows.pivot(index="task", columns="shots", values="acc_diff").reindex(index=tasks, columns=list(SHOTS))
    np.testing.assert_allclose(np.ma.getdata(image.get_array()), 100 * expected.to_numpy())
    for row in rows.itertuples():
        (cell,) = by_gid(fig, f"cell:{row.task}:{row.shots}")
        stars = f"\n{row.acc_stars}" if row.acc_stars else ""  # the stars on a second line
        assert cell.get_text() == f"{100 * row.acc_diff:+.1f}{stars}"


def test_gain_heatmap_without_sft_says_so(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    _, comparisons = tables
    fig = figures.gain_heatmap_figure(comparisons[comparisons.comparison != "fomaml-sft"])
    assert by_gid(fig, "missing")


def test_nll_vs_shots_reads_back_as_the_pooled_nll(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    accuracy, comparisons = tables
    fig = figures.nll_vs_shots_figure(accuracy, comparisons, 0.95)
    for init in ("base", "sft", "fomaml"):
        line = _lines(_panel(fig, "in_domain"))[f"nll:{init}"]
        rows = accuracy[
            (accuracy.experiment == "in_domain")
            & (accuracy.task == "all")
            & (accuracy.init == init)
            & (accuracy.train_seed == "all")
        ].sort_values("shots")
        np.testing.assert_allclose(line.get_ydata(), rows.nll_mean)


def test_training_curves_read_back_as_the_metrics_and_tolerate_gaps() -> None:
    fomaml, sft = fomaml_metrics(), sft_metrics()
    fig = figures.training_curves_figure(fomaml, sft)
    for column in ("meta/loss", "meta/avg_adaptation_gap", "meta/grad_norm"):
        (line,) = by_gid(fig, f"fomaml:{column}")
        np.testing.assert_array_equal(line.get_xdata(), fomaml.step)
        np.testing.assert_allclose(line.get_ydata(), fomaml[column])
        assert by_gid(fig, f"fomaml:{column}:smooth")
    (after,) = by_gid(fig, "fomaml:heldout/loss_after")
    logged = fomaml.dropna(subset=["heldout/loss_after"])
    np.testing.assert_array_equal(after.get_xdata(), logged.step)
    np.testing.assert_allclose(after.get_ydata(), logged["heldout/loss_after"])
    (loss,) = by_gid(fig, "sft:sft/loss")
    np.testing.assert_allclose(loss.get_ydata(), sft["sft/loss"])
    assert len(by_gid(fig, "missing")) == 1  # sft/grad_norm was not logged

    only_fomaml = figures.training_curves_figure(fomaml, None)
    assert len(by_gid(only_fomaml, "missing")) == 2

    # The older eval/* names are read too.
    renamed = fomaml.rename(columns={"heldout/loss_after": "eval/query_loss_after"})
    (line,) = by_gid(figures.training_curves_figure(renamed, sft), "fomaml:eval/query_loss_after")
    np.testing.assert_allclose(line.get_ydata(), logged["heldout/loss_after"])


def test_sft_panel_draws_all_three_series() -> None:
    """train, dev and dev after adaptation: no series may be dropped for want of a colour."""
    sft = sft_metrics()
    every = sft["step"] % 10 == 0
    sft["dev/loss_before"] = np.where(every, 1.0, np.nan)
    sft["dev/loss_after"] = np.where(every, 0.8, np.nan)
    fig = figures.training_curves_figure(None, sft)
    for column in ("sft/loss", "dev/loss_before", "dev/loss_after"):
        assert len(by_gid(fig, f"sft:{column}")) == 1, column


def test_calibration_figure_reads_back_as_the_files(tmp_path: Path) -> None:
    calibration = load_calibration(write_calibration(tmp_path))
    fig = figures.calibration_figure(calibration)
    panels = {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}
    assert set(panels) == {f"experiment:{e}:{p}" for e in ("in_domain", "heldout_geometry") for p in ("lr", "curve")}
    grid, curve = calibration["grid"], calibration["curve"]
    drawn = 0
    for row in calibration["chosen"].itertuples():
        tag = f"{row.init}:{row.train_seed}:{row.shots}"
        by_lr = _lines(panels[f"experiment:{row.experiment}:lr"])
        by_step = _lines(panels[f"experiment:{row.experiment}:curve"])
        if row.shots == 0:  # nothing adapted: no rate, no curve
            assert f"lr:{tag}" not in by_lr and f"curve:{tag}" not in by_step
            continue
        drawn += 1
        mine = (
            (grid.init == row.init)
            & (grid.experiment == row.experiment)
            & (grid.train_seed == row.train_seed)
            & (grid.checkpoint == row.checkpoint)
            & (grid.shots == row.shots)
            & (grid.num_steps == row.num_steps)
        )
        points = grid[mine].sort_values("lr")
        assert len(points) == 3  # every rate of the grid, at the chosen steps and checkpoint
        np.testing.assert_allclose(by_lr[f"lr:{tag}"].get_xdata(), points.lr)
        np.testing.assert_allclose(by_lr[f"lr:{tag}"].get_ydata(), 100 * points.accuracy)
        star = by_lr[f"chosen:{tag}"]
        assert (star.get_xdata()[0], star.get_ydata()[0]) == pytest.approx((row.lr, 100 * row.accuracy))
        assert star.get_marker() == "*"
        line = by_step[f"curve:{tag}"]
        assert list(line.get_xdata()) == list(range(6)) and line.get_xdata()[0] == 0  # from step 0, unadapted
        assert line.get_ydata()[0] == pytest.approx(row.nll_before)
        assert line.get_ydata()[row.num_steps] == pytest.approx(row.nll)
        mine = (curve.init == row.init) & (curve.train_seed == row.train_seed) & (curve.checkpoint == row.checkpoint)
        steps = curve[mine & (curve.experiment == row.experiment) & (curve.shots == row.shots) & (curve.lr == row.lr)]
        np.testing.assert_allclose(line.get_ydata(), steps.sort_values("step").nll)
        # line style per initialisation
        assert by_lr[f"lr:{tag}"].get_linestyle() == style.INIT_STYLE[row.init]["linestyle"]
        assert line.get_color() == style.INIT_STYLE[row.init]["color"]
    assert drawn == 10  # 5 files x 2 tuned k > 0
    # two seeds of one initialisation: two lines each, at their own rates (never averaged)
    in_domain = _lines(panels["experiment:in_domain:lr"])
    assert (
        in_domain["chosen:fomaml:0:5"].get_xdata()[0] == 1e-3 and in_domain["chosen:fomaml:1:5"].get_xdata()[0] == 1e-4
    )
    assert by_gid(figures.calibration_figure(None), "missing")


def test_per_init_lines_without_a_train_seed_column(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    accuracy, comparisons = tables
    pooled = accuracy[accuracy.train_seed == "all"].drop(columns="train_seed")
    fig = figures.accuracy_vs_shots_figure(pooled, comparisons, 0.95)
    lines = _lines(_panel(fig, "in_domain"))
    assert not [g for g in lines if ":seed:" in str(g)]
    rows = pooled[(pooled.experiment == "in_domain") & (pooled.task == "all") & (pooled.init == "fomaml")]
    np.testing.assert_allclose(lines["acc:fomaml"].get_ydata(), 100 * rows.sort_values("shots").accuracy)


def test_missing_metrics_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--sft-metrics .*not found"):
        figures.load_metrics(tmp_path / "absent.csv", "--sft-metrics")


def test_pdf_is_byte_reproducible(tmp_path: Path, tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    accuracy, comparisons = tables
    first = style.save_figure(figures.accuracy_vs_shots_figure(accuracy, comparisons, 0.95), tmp_path / "a", "f")
    second = style.save_figure(figures.accuracy_vs_shots_figure(accuracy, comparisons, 0.95), tmp_path / "b", "f")
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_rule_adoption_reads_back_as_the_table(stats_dir: Path) -> None:
    """One panel per experiment on its primary pool (held-out, else in-domain), the base's 0-shot share dashed."""
    table = read_table(stats_dir, "rule_adoption.tsv")
    fig = figures.rule_adoption_vs_shots_figure(table, 0.95)
    for experiment, pool in (("in_domain", "in_domain"), ("heldout_geometry", "meta_test")):
        lines = _lines(_panel(fig, experiment))
        rows = table[(table.experiment == experiment) & (table.pool == pool)]
        for init in ("base", "sft", "fomaml"):
            mine = rows[rows.init == init].sort_values("shots")
            np.testing.assert_allclose(lines[f"adopt:{init}"].get_ydata(), 100 * mine.share)
        np.testing.assert_allclose(lines["adopt:base0"].get_ydata(), [100 * rows.base_share_0.iloc[0]] * 2)
    empty = figures.rule_adoption_vs_shots_figure(table.iloc[:0], 0.95)
    assert [a.get_text() for a in by_gid(empty, "missing")] == [
        "rule adoption: not applicable (no task with a synthetic rule)"
    ]
