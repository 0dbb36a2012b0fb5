"""Paper figures (PDF) and report figures (PNG), drawn only from the stats tables and training metrics.

Each ``*_figure`` function returns a matplotlib Figure; every plotted artist carries a ``gid``
(e.g. ``acc:fomaml``, ``sig:10``, ``fomaml:meta/loss``) so tests can read the data back and
compare it with ``results/stats``. Nothing here computes a statistic: every number shown is a
cell of ``accuracy.tsv``, ``comparisons.tsv`` or ``rule_adoption.tsv`` (or a logged training metric, or a value of
the tuner's calibration files, read by ``analysis.calibration``).
"""

from __future__ import annotations

import argparse
import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import NullFormatter

from fomaml_math.analysis import style, tables
from fomaml_math.analysis.calibration import load_calibration
from fomaml_math.analysis.labels import init_label, task_label
from fomaml_math.analysis.outputs import FIGURES
from fomaml_math.analysis.tables import (
    ALL_SEEDS,
    IN_DOMAIN_POOL,
    META_TEST_POOL,
    POOLED,
    experiment_order,
    init_order,
    task_order,
)
from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.errors import ConfigError

OUTPUT_FILES: tuple[str, ...] = tuple(f"{stem}.{ext}" for stem in FIGURES for ext in ("pdf", "png"))
# The comparison the significance marks and the heatmap show.
HEADLINE = "fomaml-sft"
PERCENT = 100.0
# Every pooled row a stats table may hold (a ``task`` value).
POOLS = frozenset({POOLED, META_TEST_POOL, IN_DOMAIN_POOL})
# Gain heatmap: the height of a row (two lines of cell label), the largest cell font size and the share of its cell
# a label may span (both ways; the rest keeps neighbouring labels apart), and where a task name wraps.
HEATMAP_ROW_IN = 0.3
CELL_FONTSIZE = 6.5
CELL_FILL = 0.9
HEATMAP_LABEL_CHARS = 16

# Panels of the training-curves figure: (run, title, series, x label). A series is (candidate metric
# columns, legend label): the first candidate the run logged is plotted, so both the names of
# ``training.monitor`` (``dev/loss_*``: dev_monitor, never test) and the older ``heldout/*``/``eval/*`` names work.
Series = tuple[tuple[str, ...], str]
TRAINING_PANELS: tuple[tuple[str, str, tuple[Series, ...], str], ...] = (
    (
        "fomaml",
        "FOMAML training losses",
        ((("meta/loss",), "meta-loss"), (("meta/avg_support_loss",), "support"), (("meta/avg_query_loss",), "query")),
        "meta-step",
    ),
    ("fomaml", "FOMAML adaptation gap (query − support)", ((("meta/avg_adaptation_gap",), "gap"),), "meta-step"),
    (
        "fomaml",
        "FOMAML dev loss (dev_monitor)",
        (
            (("dev/loss_before", "heldout/loss_before", "eval/query_loss_before"), "before adaptation"),
            (("dev/loss_after", "heldout/loss_after", "eval/query_loss_after"), "after adaptation"),
        ),
        "meta-step",
    ),
    ("fomaml", "FOMAML meta-gradient norm", ((("meta/grad_norm",), "grad norm"),), "meta-step"),
    (
        "sft",
        "SFT loss",
        (
            (("sft/loss",), "train"),
            (("dev/loss_before", "heldout/loss_before", "eval/loss"), "dev"),
            (("dev/loss_after",), "dev after adaptation"),
        ),
        "SFT step",
    ),
    ("sft", "SFT gradient norm", ((("sft/grad_norm",), "grad norm"),), "SFT step"),
)
# The legend titles above the panels (the marks explained): small, and wrapped to the figure's width.
CAPTION_FONTSIZE = 6
# Mean glyph width of the style's sans-serif font (DejaVu Sans: ~0.55 em for lower case and digits) in ems, rounded
# up so a wrapped line stays inside the canvas (tests/test_figure_layout.py measures the drawn text).
_GLYPH_EM = 0.6
_SERIES_COLOURS = {  # as many colours per run as its longest panel has series (zip would drop the rest)
    "fomaml": (style.OKABE_ITO["vermillion"], style.OKABE_ITO["sky_blue"], style.OKABE_ITO["bluish_green"]),
    "sft": (style.OKABE_ITO["blue"], style.OKABE_ITO["orange"], style.OKABE_ITO["reddish_purple"]),
}


def _inits(table: pd.DataFrame) -> list[str]:
    return init_order(list(table["init"].unique()))


def _shot_ticks(ax: Axes, shots: Sequence[int]) -> None:
    ax.set_xticks(sorted(set(int(s) for s in shots)))
    ax.set_xlabel("Shots (k)")


def _plot_inits(
    ax: Axes, table: pd.DataFrame, value: str, low: str, high: str, scale: float, prefix: str, inits: Sequence[str]
) -> None:
    """One line per initialisation with its CI band (gids ``<prefix>:<init>`` and ``...:ci``), and a thin line per
    training seed beside it (gid ``<prefix>:<init>:seed:<s>``) when the table holds per-seed rows."""
    seeds = table[table["train_seed"] != ALL_SEEDS] if "train_seed" in table.columns else table.iloc[:0]
    table = table[table["train_seed"] == ALL_SEEDS] if "train_seed" in table.columns else table
    for position, init in enumerate(inits):
        rows = table[table["init"] == init].sort_values("shots")
        if rows.empty:
            continue
        line_style = style.init_style(init, position)
        per_seed = seeds[seeds["init"] == init]
        if "train_seed" in per_seed.columns and per_seed["train_seed"].nunique() > 1:
            for seed, seed_rows in per_seed.groupby("train_seed"):
                seed_rows = seed_rows.sort_values("shots")
                ax.plot(
                    seed_rows["shots"].to_numpy(dtype=float),
                    seed_rows[value].to_numpy(dtype=float) * scale,
                    color=line_style["color"],
                    linewidth=0.5,
                    alpha=0.45,
                    gid=f"{prefix}:{init}:seed:{seed}",
                )
        x = rows["shots"].to_numpy(dtype=float)
        ax.fill_between(
            x,
            rows[low].to_numpy(dtype=float) * scale,
            rows[high].to_numpy(dtype=float) * scale,
            color=line_style["color"],
            alpha=0.15,
            linewidth=0,
            gid=f"{prefix}:{init}:ci",
        )
        ax.plot(x, rows[value].to_numpy(dtype=float) * scale, gid=f"{prefix}:{init}", **line_style)


def _mark_significance(
    ax: Axes, table: pd.DataFrame, comparisons: pd.DataFrame, task: str, stars: str, top: str, scale: float
) -> None:
    """Stars (Holm-adjusted, FOMAML vs SFT) above the higher CI bound of the two compared lines."""
    compared = HEADLINE.split("-")
    if "train_seed" in table.columns:
        table = table[table["train_seed"] == ALL_SEEDS]
    marks = comparisons[(comparisons["task"] == task) & (comparisons["comparison"] == HEADLINE)]
    for row in marks.itertuples(index=False):
        label = getattr(row, stars)
        if not label:
            continue
        at_shots = table[(table["shots"] == row.shots) & table["init"].isin(compared)]
        ax.annotate(
            label,
            xy=(row.shots, at_shots[top].max() * scale),
            xytext=(0, 1),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
            gid=f"sig:{row.shots}",
        )


def _wrap_caption(fig: Figure, text: str) -> str:
    """``text`` in lines as wide as the figure, broken after a ``;`` where it can (one clause a line), else at a
    space: a legend title is one line unless broken, and a long one centred above a single-column figure would run
    past both of its edges."""
    characters = int(fig.get_figwidth() * 72 / (CAPTION_FONTSIZE * _GLYPH_EM))  # 72 points per inch
    parts = re.split(r"(?<=;)(\s+)", text)  # clause, separator, clause, ...
    lines = textwrap.wrap(parts[0], characters, break_on_hyphens=False)
    for separator, clause in zip(parts[1::2], parts[2::2], strict=True):
        if len(lines[-1]) + len(separator) + len(clause) <= characters:
            lines[-1] += separator + clause
        else:
            lines += textwrap.wrap(clause, characters, break_on_hyphens=False)
    return "\n".join(lines)


def _legend(fig: Figure, ax: Axes, ci_level: float) -> None:
    """One legend above the panels (inside an axes it would hide lines), with the marks explained."""
    a, b = (init_label(i) for i in HEADLINE.split("-"))
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside upper center",
        ncols=min(len(labels), 2),  # 4 inits in one row run past a one-panel figure's edges
        title=_wrap_caption(
            fig,
            f"shaded: {ci_level:.0%} CI per line (unadjusted); thin: one training seed;  *: {a} vs {b}, Holm-adjusted",
        ),
        title_fontsize=CAPTION_FONTSIZE,
    )


def experiments_of(table: pd.DataFrame) -> list[str]:
    return experiment_order(list(table["experiment"].unique())) if "experiment" in table.columns else [""]


def _of_experiment(table: pd.DataFrame, experiment: str) -> pd.DataFrame:
    return table[table["experiment"] == experiment] if "experiment" in table.columns else table


def _main_pool(accuracy: pd.DataFrame) -> str:
    """The primary family's pool: the held-out tasks when the experiment has them, else all tasks."""
    return META_TEST_POOL if (accuracy["task"] == META_TEST_POOL).any() else POOLED


def _per_init_figure(
    accuracy: pd.DataFrame,
    comparisons: pd.DataFrame,
    ci_level: float,
    *,
    value: str,
    low: str,
    high: str,
    stars: str,
    scale: float,
    prefix: str,
    ylabel: str,
) -> Figure:
    """One panel per experiment (gid ``experiment:<name>``), its primary pool."""
    experiments = experiments_of(accuracy)
    width = style.SINGLE_COLUMN_IN if len(experiments) == 1 else style.DOUBLE_COLUMN_IN
    with style.context():
        fig = Figure(figsize=(width, 2.7), layout="constrained")
        axes = fig.subplots(1, len(experiments), sharey=True, squeeze=False).ravel()
        for ax, experiment in zip(axes, experiments, strict=True):
            rows = _of_experiment(accuracy, experiment)
            pool = _main_pool(rows)
            pooled = rows[rows["task"] == pool]
            ax.set_gid(f"experiment:{experiment}")
            _plot_inits(ax, pooled, value, low, high, scale, prefix, _inits(rows))
            _mark_significance(ax, pooled, _of_experiment(comparisons, experiment), pool, stars, high, scale)
            _shot_ticks(ax, pooled["shots"])
            if len(experiments) > 1:
                ax.set_title(f"{experiment} ({'held-out tasks' if pool == META_TEST_POOL else 'all tasks'})")
            ax.margins(y=0.12)
        axes[0].set_ylabel(ylabel)
        _legend(fig, axes[0], ci_level)
    return fig


def accuracy_vs_shots_figure(accuracy: pd.DataFrame, comparisons: pd.DataFrame, ci_level: float) -> Figure:
    """Pooled accuracy (task ``all``) against shots, one line per initialisation."""
    return _per_init_figure(
        accuracy,
        comparisons,
        ci_level,
        value="accuracy",
        low="accuracy_ci_low",
        high="accuracy_ci_high",
        stars="acc_stars",
        scale=PERCENT,
        prefix="acc",
        ylabel="Accuracy (%)",
    )


def nll_vs_shots_figure(accuracy: pd.DataFrame, comparisons: pd.DataFrame, ci_level: float) -> Figure:
    """Pooled mean gold-solution NLL against shots (lower is better)."""
    return _per_init_figure(
        accuracy,
        comparisons,
        ci_level,
        value="nll_mean",
        low="nll_ci_low",
        high="nll_ci_high",
        stars="nll_stars",
        scale=1.0,
        prefix="nll",
        ylabel="Gold-solution NLL (nats/token)",
    )


def accuracy_vs_shots_by_task_figure(accuracy: pd.DataFrame, comparisons: pd.DataFrame, ci_level: float) -> Figure:
    """Small multiples for the first experiment: one panel per task (gid of each panel ``task:<task>``)."""
    experiment = experiments_of(accuracy)[0]
    accuracy = _of_experiment(accuracy, experiment)
    comparisons = _of_experiment(comparisons, experiment)
    tasks = [t for t in task_order(list(accuracy["task"].unique())) if t not in POOLS]
    ncols = min(4, max(1, len(tasks)))
    nrows = max(1, math.ceil(len(tasks) / ncols))
    inits = _inits(accuracy)
    with style.context():
        fig = Figure(figsize=(style.DOUBLE_COLUMN_IN, 0.4 + 1.7 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
        for ax, task in zip(axes, tasks, strict=False):
            rows = accuracy[accuracy["task"] == task]
            ax.set_gid(f"task:{task}")
            _plot_inits(ax, rows, "accuracy", "accuracy_ci_low", "accuracy_ci_high", PERCENT, "acc", inits)
            _mark_significance(ax, rows, comparisons, task, "acc_stars", "accuracy_ci_high", PERCENT)
            ax.set_title(task_label(task))
            _shot_ticks(ax, accuracy["shots"])
            ax.margins(y=0.12)
        for ax in axes[len(tasks) :]:
            ax.set_visible(False)
        for ax in axes[::ncols]:
            ax.set_ylabel("Accuracy (%)")
        if tasks:
            _legend(fig, axes[0], ci_level)
    return fig


def _cell_label(value: float, stars: str) -> str:
    """The value with one decimal, its stars (if any) on a second line: one line would be wider than a cell."""
    return f"{value:+.1f}" + (f"\n{stars}" if stars else "")


def _fit_cell_labels(fig: Figure, ax: Axes, labels: Sequence[Text], shape: tuple[int, int]) -> None:
    """Give every cell label one font size, the largest up to :data:`CELL_FONTSIZE` at which each label fits
    inside :data:`CELL_FILL` of its cell. Both are measured on the laid-out figure in display units, so the ratio
    holds at any dpi (a text's extent scales with the font size, up to glyph hinting, which the margin absorbs)."""
    if not labels:
        return
    for label in labels:
        label.set_fontsize(CELL_FONTSIZE)
    fig.draw_without_rendering()  # runs the constrained layout: the axes' final size
    rows, columns = shape
    width, height = ax.bbox.width / columns, ax.bbox.height / rows
    boxes = [label.get_window_extent() for label in labels]
    scale = min(min(CELL_FILL * width / box.width, CELL_FILL * height / box.height) for box in boxes)
    for label in labels:
        label.set_fontsize(min(CELL_FONTSIZE, CELL_FONTSIZE * scale))


def gain_heatmap_figure(comparisons: pd.DataFrame, comparison: str = HEADLINE) -> Figure:
    """Accuracy difference (percentage points) per task × shots, pooled rows last, with stars.

    The image array (``AxesImage`` with gid ``heatmap``) holds ``acc_diff * 100``; rows follow
    :func:`distinct_rows`, columns the sorted shot counts. Each cell's label (gid ``cell:<task>:<shots>``) fits
    inside its cell at the saved size.
    """
    comparisons = _of_experiment(comparisons, experiments_of(comparisons)[0]) if len(comparisons) else comparisons
    rows = comparisons[comparisons["comparison"] == comparison]
    tasks = distinct_rows(rows)
    with style.context():
        fig = Figure(figsize=(style.SINGLE_COLUMN_IN, 0.9 + HEATMAP_ROW_IN * max(1, len(tasks))), layout="constrained")
        ax = fig.add_subplot()
        if rows.empty:
            ax.text(0.5, 0.5, f"{comparison}: not available", ha="center", va="center", gid="missing")
            ax.set_axis_off()
            return fig
        shots = sorted(int(s) for s in rows["shots"].unique())
        grid = rows.pivot(index="task", columns="shots", values="acc_diff").reindex(index=tasks, columns=shots)
        stars = rows.pivot(index="task", columns="shots", values="acc_stars").reindex(index=tasks, columns=shots)
        values = grid.to_numpy(dtype=float) * PERCENT
        finite = values[np.isfinite(values)]
        limit = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
        cmap = matplotlib.colormaps[style.DIVERGING_CMAP].with_extremes(bad="#DDDDDD")
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
        image.set_gid("heatmap")
        labels = []
        for i, task in enumerate(tasks):
            for j, shot in enumerate(shots):
                value = values[i, j]
                if not np.isfinite(value):
                    continue
                mark = stars.iloc[i, j] if isinstance(stars.iloc[i, j], str) else ""
                labels.append(
                    ax.text(
                        j,
                        i,
                        _cell_label(value, mark),
                        ha="center",
                        va="center",
                        multialignment="center",
                        color="white" if abs(value) > 0.6 * limit else "black",
                        gid=f"cell:{task}:{shot}",
                    )
                )
        pools = sum(t in POOLS for t in tasks)
        if pools and len(tasks) > pools:
            ax.axhline(len(tasks) - pools - 0.5, color="white", linewidth=2.0)
        ax.set_xticks(range(len(shots)), [str(s) for s in shots])
        # long task names on two lines: the width they leave goes to the cells
        ax.set_yticks(range(len(tasks)), [textwrap.fill(task_label(t), HEATMAP_LABEL_CHARS) for t in tasks])
        ax.set_xlabel("Shots (k)")
        ax.grid(False)
        a, _, b = comparison.partition("-")
        colorbar = fig.colorbar(image, ax=ax, shrink=0.9)
        colorbar.set_label(f"{init_label(a)} − {init_label(b)} accuracy (pp)")
        _fit_cell_labels(fig, ax, labels, values.shape)
    return fig


def pool_tasks(table: pd.DataFrame) -> dict[str, frozenset[str]]:
    """The tasks each pooled row of a stats table (``task`` and ``task_role`` columns, one experiment) covers,
    read from its per-task rows' roles: the held-out pool its ``meta_test`` tasks, the in-domain pool its ``train``
    tasks, ``all`` every task."""
    roles = table[~table["task"].isin(POOLS)].groupby("task")["task_role"].first()
    return {
        POOLED: frozenset(roles.index),
        META_TEST_POOL: frozenset(roles.index[roles == "meta_test"]),
        IN_DOMAIN_POOL: frozenset(roles.index[roles == "train"]),
    }


def distinct_rows(table: pd.DataFrame) -> list[str]:
    """The task and pool rows of a stats table (one experiment) in :func:`task_order`, a pool dropped when it covers
    the same tasks as a pool before it: with ``in_domain_rows: false`` (docs/evaluation.md) ``all`` is the held-out
    pool again, the same numbers, and the held-out row (the primary pool, its per-shot family's stars) is kept."""
    tasks = task_order(list(table["task"].unique()))
    if "task_role" not in table.columns:
        return tasks
    covered = pool_tasks(table)
    shown: list[frozenset[str]] = []
    rows = []
    for task in tasks:
        if task in POOLS:
            if covered[task] in shown:
                continue
            shown.append(covered[task])
        rows.append(task)
    return rows


def load_metrics(path: str | Path | None, flag: str) -> pd.DataFrame | None:
    """A training metrics CSV (one row per step, a ``step`` column), or None when not given."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: file not found")
    frame = pd.read_csv(path)
    if "step" not in frame.columns:
        raise ConfigError(f"{flag} {path}: no 'step' column")
    return frame.apply(pd.to_numeric, errors="coerce")


def _plot_series(ax: Axes, frame: pd.DataFrame, run: str, column: str, label: str, colour: str) -> None:
    series = frame[["step", column]].dropna()
    steps, values = series["step"].to_numpy(dtype=float), series[column].to_numpy(dtype=float)
    if len(series) <= 50 or len(series) < len(frame) / 2:  # periodic evaluations: points joined by lines
        ax.plot(steps, values, color=colour, marker="o", markersize=2.5, label=label, gid=f"{run}:{column}")
        return
    # Noisy per-step values faint, a centred rolling mean on top (window ~2% of training).
    window = max(5, len(series) // 50)
    smooth = series[column].rolling(window, center=True, min_periods=1).mean().to_numpy(dtype=float)
    ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.6, gid=f"{run}:{column}")
    ax.plot(steps, smooth, color=colour, label=label, gid=f"{run}:{column}:smooth")


def _logged(frame: pd.DataFrame | None, candidates: tuple[str, ...]) -> str | None:
    """The first candidate column with at least one value, if any."""
    if frame is None:
        return None
    return next((c for c in candidates if c in frame.columns and frame[c].notna().any()), None)


def training_curves_figure(fomaml: pd.DataFrame | None, sft: pd.DataFrame | None) -> Figure:
    """FOMAML and SFT training metrics against their own steps; a panel with nothing logged says so."""
    runs = {"fomaml": fomaml, "sft": sft}
    with style.context():
        fig = Figure(figsize=(style.DOUBLE_COLUMN_IN, 4.2), layout="constrained")
        axes = fig.subplots(2, 3).ravel()
        for ax, (run, title, series, xlabel) in zip(axes, TRAINING_PANELS, strict=True):
            frame = runs[run]
            ax.set_title(title)
            # Colours follow the series' position in the panel, so they do not shift when one is missing.
            present = [
                (column, label, colour)
                for (candidates, label), colour in zip(series, _SERIES_COLOURS[run], strict=False)
                if (column := _logged(frame, candidates)) is not None
            ]
            if frame is None or not present:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, gid="missing")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            for column, label, colour in present:
                _plot_series(ax, frame, run, column, label, colour)
            ax.set_xlabel(xlabel)
            if len(series) > 1:
                ax.legend()
    return fig


def _calibration_panels(by_lr: Axes, by_step: Axes, calibration: dict[str, pd.DataFrame], experiment: str) -> None:
    """One experiment's tuned choices (k > 0): dev accuracy against the rate, dev NLL against the step."""
    chosen, grid, curve = (_of_experiment(calibration[name], experiment) for name in ("chosen", "grid", "curve"))
    chosen = chosen[chosen["shots"] > 0]
    inits = init_order(list(chosen["init"].unique()))
    ks = sorted(int(k) for k in chosen["shots"].unique())
    labelled: set[str] = set()
    for row in chosen.sort_values(["train_seed", "shots"], ascending=[True, False]).itertuples(index=False):
        line_style = style.init_style(row.init, inits.index(row.init))
        # lighter for smaller k, so the bands of one initialisation stay apart
        alpha = 1.0 if len(ks) == 1 else 0.4 + 0.6 * ks.index(int(row.shots)) / (len(ks) - 1)
        label = line_style.pop("label") if row.init not in labelled else "_nolegend_"
        labelled.add(row.init)
        tag = f"{row.init}:{row.train_seed}:{int(row.shots)}"
        mine = (
            (grid["init"] == row.init)
            & (grid["train_seed"] == row.train_seed)
            & (grid["checkpoint"] == row.checkpoint)
            & (grid["shots"] == row.shots)
        )
        points = grid[mine & (grid["num_steps"] == row.num_steps)].sort_values("lr")
        line_style |= {"label": label, "alpha": alpha}
        by_lr.plot(points["lr"], points["accuracy"].astype(float) * PERCENT, gid=f"lr:{tag}", **line_style)
        # not adapting (0 steps, lr 0): every rate's point is the same model; the star sits at the grid's first rate
        star_lr = row.lr if int(row.num_steps) > 0 or points.empty else float(points["lr"].min())
        by_lr.plot([star_lr], [row.accuracy * PERCENT], marker="*", markersize=9, linestyle="none",
                   color=line_style["color"], alpha=alpha, gid=f"chosen:{tag}")  # fmt: skip
        mine = (
            (curve["init"] == row.init)
            & (curve["train_seed"] == row.train_seed)
            & (curve["checkpoint"] == row.checkpoint)
            & (curve["shots"] == row.shots)
        )
        steps = curve[mine & np.isclose(curve["lr"].astype(float), row.lr)].sort_values("step")
        by_step.plot(steps["step"], steps["nll"].astype(float), gid=f"curve:{tag}", **(line_style | {"marker": None}))
    by_lr.set_xscale("log")
    # the grid's own rates as the ticks (a grid within one decade or two would otherwise show one label or labels
    # over each other)
    rates = sorted({float(v) for v in grid["lr"] if float(v) > 0}) if len(grid) else []
    if rates:
        by_lr.set_xticks(rates, [f"{v:g}" for v in rates])
    by_lr.xaxis.set_minor_formatter(NullFormatter())
    by_lr.set_xlabel("Adaptation learning rate")
    by_lr.set_ylabel("Dev accuracy (%)")
    by_lr.set_title(f"{experiment + ': ' if experiment else ''}at the chosen steps and checkpoint (star: chosen)")
    by_step.set_xlabel("Adaptation step")
    by_step.set_ylabel("Dev NLL (nats/token)")
    by_step.set_title("Adaptation speed at the chosen rate")
    if labelled:
        by_step.legend(title="lighter: fewer shots (k)", title_fontsize=6)


def calibration_figure(calibration: dict[str, pd.DataFrame] | None) -> Figure:
    """The tuner's choices, one row of two panels per experiment (gids ``experiment:<name>:lr`` and
    ``experiment:<name>:curve``), per init, training seed and tuned k > 0. Left: dev accuracy (%) against the
    adaptation learning rate at the chosen step count and checkpoint (gid ``lr:<init>:<seed>:<k>``; the choice
    starred, gid ``chosen:<init>:<seed>:<k>``). Right: dev NLL per adaptation step from step 0 at the chosen rate
    (gid ``curve:<init>:<seed>:<k>``). Without calibration files: one panel saying so (gid ``missing``)."""
    with style.context():
        experiments = experiments_of(calibration["chosen"]) if calibration is not None else []
        fig = Figure(figsize=(style.DOUBLE_COLUMN_IN, 2.6 * max(1, len(experiments))), layout="constrained")
        if calibration is None or calibration["chosen"].empty:
            ax = fig.add_subplot()
            ax.text(0.5, 0.5, "no calibration files", ha="center", va="center", transform=ax.transAxes, gid="missing")
            ax.set_axis_off()
            return fig
        axes = fig.subplots(len(experiments), 2, squeeze=False)
        for (by_lr, by_step), experiment in zip(axes, experiments, strict=True):
            by_lr.set_gid(f"experiment:{experiment}:lr")
            by_step.set_gid(f"experiment:{experiment}:curve")
            _calibration_panels(by_lr, by_step, calibration, experiment)
    return fig


def rule_adoption_vs_shots_figure(table: pd.DataFrame | None, ci_level: float) -> Figure:
    """Share of answers that follow the task's own rule against shots, one panel per experiment (gid
    ``experiment:<name>``) on its held-out pool (else its in-domain pool): one line per initialisation with its CI
    band (gids ``adopt:<init>``, ``adopt:<init>:ci``) and the base's 0-shot share dashed (gid ``adopt:base0``).
    Without a task with a synthetic rule (real MATH: an empty table) or without the table: one panel saying so
    (gid ``missing``)."""
    experiments = experiments_of(table) if table is not None and len(table) else []
    width = style.SINGLE_COLUMN_IN if len(experiments) <= 1 else style.DOUBLE_COLUMN_IN
    with style.context():
        fig = Figure(figsize=(width, 2.7), layout="constrained")
        if not experiments:
            ax = fig.add_subplot()
            text = (
                "rule adoption: no rule_adoption.tsv"
                if table is None
                else "rule adoption: not applicable (no task with a synthetic rule)"
            )
            ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, gid="missing")
            ax.set_axis_off()
            return fig
        axes = fig.subplots(1, len(experiments), sharey=True, squeeze=False).ravel()
        for ax, experiment in zip(axes, experiments, strict=True):
            rows = _of_experiment(table, experiment)
            pool = META_TEST_POOL if (rows["pool"] == META_TEST_POOL).any() else IN_DOMAIN_POOL
            pooled = rows[rows["pool"] == pool].assign(train_seed=ALL_SEEDS)  # over all seeds: no per-seed lines
            ax.set_gid(f"experiment:{experiment}")
            _plot_inits(ax, pooled, "share", "share_ci_low", "share_ci_high", PERCENT, "adopt", _inits(pooled))
            reference = pooled["base_share_0"].dropna()
            if len(reference):
                ax.axhline(
                    float(reference.iloc[0]) * PERCENT,
                    color=style.init_style("base", 0)["color"],
                    linestyle="--",
                    linewidth=0.8,
                    label="Base, 0 shots",
                    gid="adopt:base0",
                )
            _shot_ticks(ax, pooled["shots"])
            ax.set_ylim(0, 100)
            title = "held-out tasks" if pool == META_TEST_POOL else "in-domain tasks"
            ax.set_title(f"{experiment} ({title})" if len(experiments) > 1 else title.capitalize())
        axes[0].set_ylabel("Answers with the task's units digit (%)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="outside upper center",
            ncols=len(labels),
            title=_wrap_caption(
                fig, f"shaded: {ci_level:.0%} CI per line (unadjusted); dashed: the base model's 0-shot share"
            ),
            title_fontsize=CAPTION_FONTSIZE,
        )
    return fig


def build_figures(
    accuracy: pd.DataFrame,
    comparisons: pd.DataFrame,
    fomaml_metrics: pd.DataFrame | None,
    sft_metrics: pd.DataFrame | None,
    ci_level: float,
    calibration: dict[str, pd.DataFrame] | None = None,
    rule_adoption: pd.DataFrame | None = None,
) -> dict[str, Figure]:
    """Every figure of the study, keyed by file stem (:data:`FIGURES`)."""
    return {
        "rule_adoption_vs_shots": rule_adoption_vs_shots_figure(rule_adoption, ci_level),
        "calibration": calibration_figure(calibration),
        "accuracy_vs_shots": accuracy_vs_shots_figure(accuracy, comparisons, ci_level),
        "accuracy_vs_shots_by_task": accuracy_vs_shots_by_task_figure(accuracy, comparisons, ci_level),
        "gain_heatmap": gain_heatmap_figure(comparisons),
        "nll_vs_shots": nll_vs_shots_figure(accuracy, comparisons, ci_level),
        "training_curves": training_curves_figure(fomaml_metrics, sft_metrics),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fomaml_math figures",
        description="Draw the study's figures (PDF + PNG) from results/stats and the training metrics.",
    )
    add_settings_arguments(parser)
    parser.add_argument(
        "--stats-dir", required=True, type=Path, help="folder with accuracy.tsv, comparisons.tsv and rule_adoption.tsv"
    )
    parser.add_argument("--fomaml-metrics", type=Path, help="results/models/fomaml/metrics.csv")
    parser.add_argument("--sft-metrics", type=Path, help="results/models/sft/metrics.csv")
    parser.add_argument(
        "--calibration", nargs="*", default=[], type=Path, metavar="JSON", help="calibration results (optional)"
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="writes <figure>.pdf and <figure>.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = tables.StatsSettings.from_settings(settings_from_args(args, "figures"))
    accuracy = tables.read_table(args.stats_dir, "accuracy.tsv")
    comparisons = tables.read_table(args.stats_dir, "comparisons.tsv")
    fomaml = load_metrics(args.fomaml_metrics, "--fomaml-metrics")
    sft = load_metrics(args.sft_metrics, "--sft-metrics")
    calibration = load_calibration(args.calibration) if args.calibration else None
    # Optional: a stats folder written before the rule-adoption control gets a panel saying the table is missing.
    has_adoption = (args.stats_dir / "rule_adoption.tsv").is_file()
    adoption = tables.read_table(args.stats_dir, "rule_adoption.tsv") if has_adoption else None
    figures = build_figures(accuracy, comparisons, fomaml, sft, settings.ci_level, calibration, adoption)
    for stem, fig in figures.items():
        style.save_figure(fig, args.output_dir, stem)
    print(f"figures: {len(figures)} figures (PDF + PNG) -> {args.output_dir}")
    return 0
