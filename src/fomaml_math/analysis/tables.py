"""The statistics tables as a contract: their columns, the values readers match on, the settings, and reading.

The ``stats`` stage writes the tables (``analysis.stats``); ``figures`` and ``summary`` read them. This module
imports pandas and the package's leaf contracts only (no scipy, statsmodels or matplotlib), so a reader does not
load the statistics to read a TSV. The file names the Snakefile declares are in ``analysis.outputs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.rows import METALOOP, REPORTED_INITS
from fomaml_math.subjects import MATH_TASKS

# ---------------------------------------------------------------------------------------------
# Values that name rows

POOLED = "all"  # the pool of every task (a ``task`` or ``pool`` value)
META_TEST_POOL = "meta_test"  # the pool of the held-out tasks
IN_DOMAIN_POOL = "in_domain"  # the pool of the train-role (meta-trained on) tasks (rule_adoption.tsv)
ALL_SEEDS = "all"  # ``train_seed`` of a row over every training seed (accuracy.tsv)
EXPERIMENT_ORDER: tuple[str, ...] = ("in_domain",)
# (a, b) reads "a − b": positive accuracy differences favour a, negative NLL differences favour a.
COMPARISONS: tuple[tuple[str, str], ...] = (("fomaml", "sft"), ("fomaml", "base"), ("sft", "base"))
# Always in the secondary family, never a primary contrast or per-shot comparison: the meta-training inner loop
# row against FOMAML's primary row (same weights, shots and problems; only the adaptation differs).
SECONDARY_COMPARISONS: tuple[tuple[str, str], ...] = ((METALOOP, "fomaml"),)
# ``ci_method`` values.
SEED_T = "seed-t"  # t-interval over training seeds and problems (crossed design, inference.crossed_estimate)
PROBLEM_BOOTSTRAP = "problem-bootstrap"  # one training seed: percentile bootstrap over problems
# Where nothing varied (analysis.bounds): "clopper-pearson" (an accuracy all 0 or all 1), "wilson" (an accuracy
# constant inside (0, 1)), "newcombe" (a difference whose seed-aware interval was a point).


def comparison_name(a: str, b: str) -> str:
    return f"{a}-{b}"


# ---------------------------------------------------------------------------------------------
# Orders (rows, panels and lines follow them)


def ordered(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """``values`` (deduplicated) in the ``preferred`` order first, then the rest alphabetically."""
    unique = list(dict.fromkeys(values))
    return [v for v in preferred if v in unique] + sorted(v for v in unique if v not in preferred)


def task_order(tasks: Sequence[str]) -> list[str]:
    """Tasks in the MATH subject order, others alphabetically; the pools (meta_test, in_domain, all) last."""
    pools = [p for p in (META_TEST_POOL, IN_DOMAIN_POOL, POOLED) if p in tasks]
    return ordered([t for t in tasks if t not in pools], MATH_TASKS) + pools


def experiment_order(experiments: Sequence[str]) -> list[str]:
    return ordered(experiments, EXPERIMENT_ORDER)


def init_order(inits: Sequence[str]) -> list[str]:
    return ordered(inits, REPORTED_INITS)


def sort_in_order(frame: pd.DataFrame, columns: list[str], orders: dict[str, list[str]]) -> pd.DataFrame:
    """``frame`` sorted by ``columns``; a column named in ``orders`` by its values' positions there."""

    def key(series: pd.Series) -> pd.Series:
        return series.map({v: k for k, v in enumerate(orders[series.name])}) if series.name in orders else series

    return frame.sort_values(columns, key=key)


# ---------------------------------------------------------------------------------------------
# Settings (the config's ``stats`` section and the global ``seed``; the schema fills every default)


@dataclass(frozen=True)
class StatsSettings:
    seed: int
    bootstrap_samples: int
    ci_level: float
    alpha: float
    equivalence_margin_pp: float
    primary_contrast: str
    per_shot_comparisons: tuple[str, ...]
    target_effect_pp: float
    planted_replicates: int
    aa_splits: int  # A/A split re-analyses per control row (every distinct split up to this many)
    # Generated leave-one-subject-out folds (config.loso_group): the pooled row's name and the fold experiments.
    loso_pooled: str | None
    loso_folds: tuple[str, ...]
    # Training seeds per arm below which the Answer is exploratory (stats.primary.min_seeds_confirmatory).
    min_seeds_confirmatory: int = 5

    @property
    def margin(self) -> float:
        """The equivalence margin as a difference of proportions."""
        return self.equivalence_margin_pp / 100.0

    @property
    def target_effect(self) -> float:
        """The effect the study is sized for, as a difference of proportions."""
        return self.target_effect_pp / 100.0

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> StatsSettings:
        """From the stage settings ``{"seed": ..., "stats": {...}}`` (config.stage_settings)."""
        try:
            stats = settings["stats"]
            loso = settings.get("loso")  # only in a study with generated folds (config.stage_settings)
            made = cls(
                seed=int(settings["seed"]),
                bootstrap_samples=int(stats["bootstrap_samples"]),
                ci_level=float(stats["ci_level"]),
                alpha=float(stats["alpha"]),
                equivalence_margin_pp=float(stats["equivalence_margin_pp"]),
                primary_contrast=str(stats["primary"]["contrast"]),
                per_shot_comparisons=tuple(stats["per_shot"]["comparisons"]),
                target_effect_pp=float(stats["target_effect_pp"]),
                planted_replicates=int(stats["planted"]["replicates"]),
                aa_splits=int(stats["aa"]["splits"]),
                loso_pooled=None if loso is None else str(loso["pooled"]),
                loso_folds=() if loso is None else tuple(loso["folds"]),
                min_seeds_confirmatory=int(stats["primary"].get("min_seeds_confirmatory", 5)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"settings: missing {exc} (expected seed and stats.bootstrap_samples, stats.ci_level, stats.alpha, "
                "stats.equivalence_margin_pp, stats.primary.contrast, stats.per_shot.comparisons, "
                "stats.target_effect_pp, stats.planted.replicates, stats.aa.splits; with generated folds loso.pooled, "
                "loso.folds)"
            ) from exc
        if made.bootstrap_samples < 1:
            raise ConfigError(f"stats.bootstrap_samples: expected a positive integer, got {made.bootstrap_samples}")
        for key in ("ci_level", "alpha"):
            value = getattr(made, key)
            if not 0 < value < 1:
                raise ConfigError(f"stats.{key}: expected a number strictly between 0 and 1, got {value}")
        if not 0 < made.equivalence_margin_pp < 100:
            raise ConfigError(
                f"stats.equivalence_margin_pp: expected percentage points in (0, 100), got {made.equivalence_margin_pp}"
            )
        known = {comparison_name(a, b) for a, b in COMPARISONS}
        unknown = [c for c in made.per_shot_comparisons if c not in known]
        if unknown or not made.per_shot_comparisons:
            raise ConfigError(
                f"stats.per_shot.comparisons: expected a non-empty list of {', '.join(sorted(known))}, got "
                f"{list(made.per_shot_comparisons)}"
            )
        if made.min_seeds_confirmatory < 2:
            raise ConfigError(
                f"stats.primary.min_seeds_confirmatory: expected an integer >= 2, got {made.min_seeds_confirmatory}"
            )
        if made.primary_contrast not in known:
            raise ConfigError(
                f"stats.primary.contrast: expected one of {', '.join(sorted(known))}, got {made.primary_contrast!r}"
            )
        return made


# ---------------------------------------------------------------------------------------------
# Columns, in file order (definitions in docs/statistics.md)

ACCURACY_COLUMNS = [
    "experiment",
    "init",
    "train_seed",
    "task",
    "task_role",
    "shots",
    "n_seeds",
    "n_problems",
    "n_repeats",
    "accuracy",
    "accuracy_se",
    "accuracy_df",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "ci_method",
    "accuracy_seed_sd",
    "accuracy_repeat_sd",
    "nll_n",
    "nll_mean",
    "nll_ci_low",
    "nll_ci_high",
    "no_answer_rate",
    "grade_failure_rate",
    "truncation_rate",
    "mean_gen_tokens",
]
COMPARISON_COLUMNS = [
    "experiment",
    "task",
    "task_role",
    "shots",
    "comparison",
    "init_a",
    "init_b",
    "family",
    "family_size",
    "n_problems",
    "n_seeds_a",
    "n_seeds_b",
    "acc_a",
    "acc_b",
    "acc_diff",
    "acc_diff_se",
    "acc_diff_df",
    "acc_diff_ci_low",
    "acc_diff_ci_high",
    "ci_method",
    "acc_diff_sci_level",
    "acc_diff_sci_low",
    "acc_diff_sci_high",
    "seed_note",
    "acc_test",
    "acc_p",
    "acc_p_holm",
    "acc_significant",
    "acc_stars",
    "acc_min_p_holm",
    "acc_can_reach_alpha",
    "tost_p_lower",
    "tost_p_upper",
    "tost_p",
    "tost_p_holm",
    "tost_min_p_holm",
    "tost_can_reach_alpha",
    "equivalent",
    "verdict",
    "mde_alpha",
    "mde",
    "power_at_target",
    "cohens_h",
    "n_a_better",
    "n_b_better",
    "n_tied",
    "discordant_odds_ratio",
    "mcnemar_p",
    "nll_n",
    "nll_a",
    "nll_b",
    "nll_diff",
    "nll_diff_se",
    "nll_diff_ci_low",
    "nll_diff_ci_high",
    "nll_test",
    "nll_p",
    "nll_p_holm",
    "nll_significant",
    "nll_stars",
    "wilcoxon_stat",
    "wilcoxon_p",
    "nll_note",
]
_ACROSS_FIELDS = (
    "macro_diff",
    "macro_se",
    "macro_df",
    "macro_ci_low",
    "macro_ci_high",
    "p",
    "p_holm",
    "significant",
    "stars",
    "n_positive",
    "n_negative",
    "wilcoxon_stat",
    "wilcoxon_p",
    "wilcoxon_p_holm",
    "wilcoxon_min_p_holm",
    "wilcoxon_can_reach_alpha",
    "note",
)
ACROSS_TASKS_COLUMNS = ["experiment", "pool", "shots", "comparison", "n_tasks"] + [
    f"{prefix}_{field}" for prefix in ("acc", "nll") for field in _ACROSS_FIELDS
]
CONTROL_COLUMNS = [
    "experiment",
    "init",
    "train_seed",
    "pool",
    "shots",
    "main_shot_seed",
    "control_shot_seed",
    "n_problems",
    "n_draws_main",
    "n_draws_control",
    "acc_main",
    "acc_control",
    "acc_diff",
    "acc_diff_se",
    "acc_diff_df",
    "acc_diff_ci_low",
    "acc_diff_ci_high",
    "acc_p",
    "acc_p_holm",
    "significant",
    "tost_p",
    "equivalent",
    "note",
]
GENERATION_COLUMNS = [
    "experiment",
    "init",
    "shots",
    "n_seeds",
    "n_rows",
    "no_answer_rate",
    "truncation_rate",
    "mean_gen_tokens",
    "grade_failure_rate",
]
# The adaptation's support loss, per adaptation and averaged.
_ADAPTATION_FIELDS = [
    "support_loss_before",
    "support_loss_after",
    "support_loss_change",
    "weight_change",
]
ADAPTATION_COLUMNS = [
    "experiment",
    "train_seed",
    "init",
    "task",
    "shots",
    "repeat",
    "n_problems",
    "adapt_optimizer",
    "adapt_lr",
    "adapt_steps",
    *_ADAPTATION_FIELDS,
    "nll_zero_shot",
    "nll_after",
    "nll_change",
    "nll_change_rel",
    "outputs_changed",
]
ADAPTATION_SUMMARY_COLUMNS = [
    "experiment",
    "init",
    "shots",
    "n_runs",
    "adapt_choices",  # each training seed's (optimizer, lr, steps) as used, never an average of rates
    *_ADAPTATION_FIELDS,
    "nll_change",
    "nll_change_rel",
    "outputs_changed",
    "low_change",
]
SAMPLE_EFFICIENCY_COLUMNS = [
    "experiment",
    "pool",
    "learner",
    "reference",
    "reference_shots",
    "target_accuracy",
    "learner_max_shots",
    "learner_accuracy_at_max",
    "shots_to_match",
    "shots_reached",  # the first evaluated k at which the learner is at the target (NaN: not within max k)
    "shots_before",  # the evaluated k before it (NaN when reached at the smallest k)
    "interpolated",  # shots_to_match lies strictly between shots_before and shots_reached (both > 0)
    "ci_low",
    "ci_high",
    "share_not_reached",
    "n_problems",
    "n_seeds_learner",
    "n_seeds_reference",
    "n_boot",
]
POSITIVE_CONTROL_COLUMNS: tuple[str, ...] = (
    "experiment", "init", "pool", "shots", "n_seeds", "n_problems", "acc_0", "acc_k", "gain", "gain_se", "gain_df",
    "gain_ci_low", "gain_ci_high", "p", "p_holm", "detected",
)  # fmt: skip
# rule_adoption.tsv: the share of answers that follow the evaluated task's own rule (analysis.rule_adoption), per
# (experiment, pool, init, shots); diff and its test against the base's 0-shot share (k > 0), Holm per pool.
RULE_ADOPTION_COLUMNS: tuple[str, ...] = (
    "experiment", "pool", "init", "shots", "n_seeds", "n_problems", "share", "share_se", "share_df", "share_ci_low",
    "share_ci_high", "no_answer_share", "base_share_0", "diff", "diff_se", "diff_df", "diff_ci_low", "diff_ci_high",
    "p", "family_size", "p_holm", "detected",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Reading


def read_table(stats_dir: str | Path, name: str) -> pd.DataFrame:
    """Read one table the stats stage wrote (text cells come back as strings, empty ones as '')."""
    path = Path(stats_dir) / name
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run the stats stage first)")
    with open(path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
    text = ("_stars", "_note", "_method", "_test", "verdict", "family", "task_role", "experiment")
    names = ("task", "init", "pool", "comparison", "note", "control", "train_seeds")
    text_columns = {c: str for c in header if c.endswith(text) or c in names}
    if "train_seed" in header and name == "accuracy.tsv":
        text_columns["train_seed"] = str  # "all" or a seed number
    frame = pd.read_csv(path, sep="\t", dtype=text_columns)
    for column in text_columns:
        frame[column] = frame[column].fillna("")
    return frame


# primary.tsv: the pre-registered primary contrast, one row per experiment (analysis.primary), and with generated
# leave-one-subject-out folds their pooled row; ``family``: PRIMARY_FAMILY (confirmatory) or FOLD_FAMILY.
PRIMARY_FAMILY = "primary"
FOLD_FAMILY = "secondary"  # a fold's own row when its pooled row is the confirmatory one (Holm over the folds)
PRIMARY_COLUMNS = [
    "experiment",
    "pool",
    "contrast",
    "family",
    "shots",
    "n_shot_counts",
    "n_problems",
    "n_seeds_a",
    "n_seeds_b",
    "acc_a",
    "acc_b",
    "diff",
    "se",
    "df",
    "seed_var",
    "problem_var",
    "ci_low",
    "ci_high",
    "p",
    "p_holm",
    "significant",
    "tost_p",
    "tost_p_holm",
    "equivalent",
    "tost_min_p",
    "tost_can_reach_alpha",
    "family_size",
    "planned_alpha",
    "mde",
    "power_at_target",
    "verdict",
    "confirmatory",
    "perm_p",
    "perm_p_floor",
    "perm_relabelings",
    "seed_sd",
    "seed_sd_ci_low",
    "seed_sd_ci_high",
]
# planted.tsv: the planted-effect check of the primary analysis, one row per experiment (analysis.planted).
PLANTED_COLUMNS = [
    "experiment",
    "contrast",
    "estimator",
    "generator",
    "n_seeds",
    "n_shot_counts",
    "n_draws",
    "n_problems",
    "gen_seed_sd",
    "gen_draw_sd",
    "gen_draw_corr",
    "gen_problem_sd",
    "replicates",
    "alpha",
    "target_effect",
    "false_positive_rate",
    "false_positive_rate_mc_se",
    "false_positive_rate_ci_high",
    "power",
    "power_mc_se",
    "closed_form_power",
    "note",
]
# aa_control.tsv: the A/A split re-analyses (analysis.negative_control), one row per control: ``draws`` (the negative
# control's shot draws of one model split into halves, the draw-clustered test of control.tsv) per k, and ``seeds``
# (one primary arm's training seeds split into halves, the primary analysis) per experiment and arm.
AA_COLUMNS = [
    "experiment",
    "control",
    "init",
    "train_seeds",
    "pool",
    "shots",
    "n_units",
    "half_size",
    "n_problems",
    "n_distinct_splits",
    "n_splits",
    "exhaustive",
    "alpha",
    "n_rejected",
    "false_positive_rate",
    "false_positive_rate_mc_se",
    "note",
]
