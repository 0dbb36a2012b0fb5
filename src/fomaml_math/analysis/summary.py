"""The study's results as Markdown (``results/summary.md``), read off the stats tables.

Every number is a cell of a ``results/stats`` table (or of a calibration file), only rounded for display.
Layout: the Answer (the pre-registered primary contrast), the per-shot family with its verdicts, the
positive controls (rule adoption, then the secondary accuracy gain) and the negative control, the held-out
tasks, the secondary meta-training inner loop row (when evaluated), generation and adaptation, the tuning
(checkpoint and adaptation per tuned k, with the adaptation speed and the criterion's agreement with dev
accuracy), sample efficiency, then the exploratory per-task section.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.analysis.calibration import edge_runs, load_calibration
from fomaml_math.analysis.labels import init_label, task_label
from fomaml_math.analysis.tables import (
    ALL_SEEDS,
    FOLD_FAMILY,
    IN_DOMAIN_POOL,
    META_TEST_POOL,
    POOLED,
    PRIMARY_FAMILY,
    SECONDARY_COMPARISONS,
    StatsSettings,
    comparison_name,
    experiment_order,
    init_order,
    read_table,
    sort_in_order,
    task_order,
)
from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.evaluation.rows import METALOOP
from fomaml_math.io import write_text

Formatter = Callable[[float], str]
OPTIONAL_TABLES = (
    "control.tsv",
    "aa_control.tsv",
    "generation.tsv",
    "adaptation_summary.tsv",
    "sample_efficiency.tsv",
    "rule_adoption.tsv",
    "positive_control.tsv",
    "primary.tsv",
    "planted.tsv",
)
VERDICTS = {"better": "**better**", "worse": "**worse**", "inconclusive": "inconclusive"}


def fmt_percent(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.1f}"


def fmt_points(value: float) -> str:
    """A difference of proportions in percentage points, signed."""
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.1f}"


def fmt_nll(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def fmt_nll_diff(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.3f}"


def fmt_p(p: float, stars: str = "") -> str:
    if not math.isfinite(p):
        return "n/a"
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return f"{text} {stars}".rstrip()


def fmt_pct(value: float, fmt: Formatter = fmt_percent) -> str:
    """A share with its % sign, or "n/a" alone (never "n/a%")."""
    text = fmt(value)
    return text if text == "n/a" else f"{text}%"


def fmt_power(value: float) -> str:
    """Power in %, or why there is none: a standard error of 0 (nothing varied) leaves no test to have power."""
    return fmt_pct(value) if math.isfinite(value) else "not computable (nothing varied: no test)"


def fmt_shots(value: float) -> str:
    return "n/a" if math.isnan(value) else ("> max" if math.isinf(value) else f"{value:.1f}")


def _interval(fmt: Formatter, value: float, low: float, high: float) -> str:
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def _family_interval(row: Any) -> str:
    """A comparison's difference beside its Holm verdict: the Bonferroni-simultaneous interval at its family's size
    (``acc_diff_sci_*``: it excludes 0 only where Holm rejects); where a table lacks it, the marginal interval
    labelled unadjusted."""
    low, high = getattr(row, "acc_diff_sci_low", math.nan), getattr(row, "acc_diff_sci_high", math.nan)
    if math.isfinite(low) and math.isfinite(high):
        return _interval(fmt_points, row.acc_diff, low, high)
    return _interval(fmt_points, row.acc_diff, row.acc_diff_ci_low, row.acc_diff_ci_high) + " (unadjusted)"


def _unadjusted(family_size: float) -> str:
    """The label of a marginal interval shown beside a Holm-adjusted p of a family of more than one test."""
    return " (interval unadjusted)" if family_size > 1 else ""


def _comparison_label(name: str) -> str:
    a, _, b = name.partition("-")
    return f"{init_label(a)} − {init_label(b)}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _experiments(frame: pd.DataFrame) -> list[str]:
    return experiment_order(list(frame["experiment"].unique())) if len(frame) else []


def _pool_text(pool: str, accuracy: pd.DataFrame, experiment: str) -> str:
    rows = accuracy[(accuracy["experiment"] == experiment) & (accuracy["train_seed"] == ALL_SEEDS)]
    tasks = [t for t in task_order(list(rows["task"].unique())) if t not in (POOLED, META_TEST_POOL)]
    if pool == META_TEST_POOL:
        held = sorted(set(rows.loc[rows["task_role"] == "meta_test", "task"]) - {META_TEST_POOL, POOLED})
        return f"held-out task(s) {', '.join(held)} pooled"
    return f"all {len(tasks)} task(s) pooled"


def _accuracy_table(accuracy: pd.DataFrame, experiment: str, task: str) -> list[str]:
    rows = accuracy[
        (accuracy["experiment"] == experiment) & (accuracy["task"] == task) & (accuracy["train_seed"] == ALL_SEEDS)
    ]
    inits = init_order(list(rows["init"].unique()))
    body = []
    for shots in sorted(rows["shots"].unique()):
        line = [str(int(shots))]
        for init in inits:
            cell = rows[(rows["shots"] == shots) & (rows["init"] == init)]
            if cell.empty:
                line.append("–")
                continue
            c = cell.iloc[0]
            text = _interval(fmt_percent, c["accuracy"], c["accuracy_ci_low"], c["accuracy_ci_high"])
            if c["n_seeds"] > 1:
                text += f" (seed SD {fmt_percent(c['accuracy_seed_sd'])}, {int(c['n_seeds'])} seeds)"
            line.append(text)
        body.append(line)
    return _table(["Shots", *(init_label(i) for i in inits)], body)


def _answer_lines(primary: pd.DataFrame | None, planted: pd.DataFrame | None, settings: StatsSettings) -> list[str]:
    """The Answer: the pre-registered primary contrast's verdict per experiment, with its power."""
    a, b = settings.primary_contrast.split("-")
    label = f"{init_label(a)} − {init_label(b)}"
    lines = ["## Answer", ""]
    if primary is None or primary.empty:
        return [*lines, f"The primary contrast ({label}, averaged over k > 0) could not be computed.", ""]
    margin = f"±{settings.equivalence_margin_pp:g} pp"
    folds = primary[primary["family"] == FOLD_FAMILY]
    confirmatory = primary[primary["family"] == PRIMARY_FAMILY]
    exploratory = _exploratory(confirmatory, settings)
    if exploratory.any():
        lines += [_exploratory_note(confirmatory[exploratory], settings), ""]
    for row, below in zip(confirmatory.itertuples(index=False), exploratory, strict=True):
        pooled = row.experiment == settings.loso_pooled
        pool = "its held-out tasks" if row.pool == META_TEST_POOL else "all its tasks"
        if pooled:
            pool = f"the mean over {len(folds)} leave-one-subject-out folds, each on its held-out subject"
        if below:
            lines.append(_exploratory_row(row, pool, label, pooled, settings))
            continue
        verdict = {
            "better": f"**{init_label(a)} is better**",
            "worse": f"**{init_label(a)} is worse**",
            "equivalent": f"**equivalent within {margin}**",
            "inconclusive": "**inconclusive**",
        }[row.verdict]
        reach = [] if row.tost_can_reach_alpha else [f"equivalence within {margin} was not reachable at this se"]
        lines.append(
            f"- `{row.experiment}` ({pool}, {int(row.n_problems)} problems, k = {row.shots}, "
            f"{int(row.n_seeds_a)}/{int(row.n_seeds_b)} {'training runs' if pooled else 'seeds'}): {label} = "
            f"{_interval(fmt_points, row.diff, row.ci_low, row.ci_high)} pp{_unadjusted(row.family_size)}, "
            f"Holm p {fmt_p(row.p_holm)} over {int(row.family_size)} confirmatory test(s): {verdict}. "
            f"Power at the target {settings.target_effect_pp:g} pp: {fmt_power(row.power_at_target)}; "
            f"MDE (80%) {_mde_phrase(row.mde)}" + "".join(f"; {r}" for r in reach) + "."
        )
    if len(folds):
        fold_rows = [
            [
                f"`{r.experiment}`",
                _interval(fmt_points, r.diff, r.ci_low, r.ci_high),
                fmt_p(r.p_holm),
                _mde_text(r.mde),
                "exploratory" if below else VERDICTS.get(r.verdict, r.verdict),
            ]
            for r, below in zip(folds.itertuples(index=False), _exploratory(folds, settings), strict=True)
        ]
        lines += [
            "",
            f"The folds of `{settings.loso_pooled}` one by one (secondary: Holm over the {len(folds)} folds; one "
            "subject each, so each alone has a fraction of the pooled row's power):",
            "",
            *_table(["Fold", f"{label} (pp, unadjusted)", "Holm p", "MDE (80%, pp)", "Verdict"], fold_rows),
        ]
    if planted is not None and not planted.empty:
        lines += ["", "The analysis checked on studies like this one (planted-effect check, `planted.tsv`):", ""]
        for row in planted.itertuples(index=False):
            lines.append(
                f"- `{row.experiment}`: {int(row.replicates)} whole studies simulated at its design "
                f"({int(row.n_seeds)} seeds per arm, {int(row.n_shot_counts)} k × {int(row.n_draws)} draws, "
                f"{int(row.n_problems)} problems) from a model fitted to its outcomes, each analysed as the Answer "
                f"is: false-positive rate {fmt_percent(row.false_positive_rate)}% (Monte Carlo se "
                f"{fmt_percent(row.false_positive_rate_mc_se)}, 95% upper bound "
                f"{fmt_percent(row.false_positive_rate_ci_high)}%; nominal {100 * row.alpha:.2g}%); with "
                f"{100 * row.target_effect:g} pp planted: power {fmt_percent(row.power)}% ± "
                f"{fmt_percent(row.power_mc_se)} "
                f"(closed form from the observed se: {fmt_power(row.closed_form_power)})."
            )
    lines += [
        "",
        f"Pre-registered (`stats.primary.contrast`): {label} on each experiment's primary pool, averaged with equal "
        f"weight over the evaluated k > 0; seed-aware t-test, {settings.ci_level:.0%} interval truncated to the "
        "possible range; TOST for equivalence." + _pooled_note(primary, settings) + " Everything below is secondary.",
        "",
    ]
    return lines


def _exploratory(rows: pd.DataFrame, settings: StatsSettings) -> pd.Series:
    """Per primary row: fewer training runs per arm than ``stats.primary.min_seeds_confirmatory``."""
    return rows[["n_seeds_a", "n_seeds_b"]].min(axis=1) < settings.min_seeds_confirmatory


def _exploratory_note(rows: pd.DataFrame, settings: StatsSettings) -> str:
    """The Answer's first words where a primary row has fewer training runs per arm than a verdict needs."""
    seeds = sorted({int(min(a, b)) for a, b in zip(rows["n_seeds_a"], rows["n_seeds_b"], strict=True)})
    names = ", ".join(f"`{name}`" for name in rows["experiment"])
    return (
        f"Exploratory: {names} rest on {'/'.join(str(s) for s in seeds)} training run(s) per arm, fewer than the "
        f"{settings.min_seeds_confirmatory} a confirmatory verdict needs (`stats.primary.min_seeds_confirmatory`; "
        "docs/statistics.md): with so few runs the seed variance, and with it the standard error, is itself "
        "barely estimated, so the estimate, interval and direction below are given without a verdict."
    )


def _exploratory_row(row: Any, pool: str, label: str, pooled: bool, settings: StatsSettings) -> str:
    """One exploratory primary row: estimate, interval, direction; no verdict."""
    a, b = (init_label(x) for x in settings.primary_contrast.split("-"))
    direction = f"{a} scored {'higher' if row.diff > 0 else 'lower'} than {b}" if row.diff != 0 else "no difference"
    excludes = row.ci_low > 0 or row.ci_high < 0
    runs = "training runs" if pooled else "seeds"
    return (
        f"- `{row.experiment}` ({pool}, {int(row.n_problems)} problems, k = {row.shots}, "
        f"{int(row.n_seeds_a)}/{int(row.n_seeds_b)} {runs}), exploratory: {label} = "
        f"{_interval(fmt_points, row.diff, row.ci_low, row.ci_high)} pp ({settings.ci_level:.0%} seed-aware "
        f"interval, {row.df:.1f} df, {'excluding' if excludes else 'including'} 0); direction: {direction}. "
        f"Whole-run permutation p {fmt_p(row.perm_p)} (the smallest it can be here: {fmt_p(row.perm_p_floor)}); "
        f"seed SD {fmt_percent(row.seed_sd)} pp [{fmt_percent(row.seed_sd_ci_low)}, "
        f"{fmt_percent(row.seed_sd_ci_high)}]; power at {settings.target_effect_pp:g} pp "
        f"{fmt_power(row.power_at_target)}, MDE (80%) {_mde_phrase(row.mde)}."
    )


def _pooled_note(primary: pd.DataFrame, settings: StatsSettings) -> str:
    """What the folds' pooled row stands for in the Answer ('' without folds)."""
    if not (primary["family"] == FOLD_FAMILY).any():
        return ""
    if not (primary["experiment"] == settings.loso_pooled).any():
        return f" No `{settings.loso_pooled}` row: not every leave-one-subject-out fold has a primary contrast."
    return (
        f" `{settings.loso_pooled}` is the held-out claim over all subjects: each fold's estimate weighted equally, "
        "the folds' trainings independent; it stands in the family for its folds."
    )


def _mde_text(mde: float) -> str:
    """The MDE in pp (a table cell), or "not computable" (nothing varied: no test has an MDE)."""
    if not math.isfinite(mde):
        return "not computable"
    return f"{100 * mde:.1f}" if mde <= 1.0 else "> 100"  # beyond any possible difference of accuracies


def _mde_phrase(mde: float) -> str:
    """The MDE in a sentence: "<x> pp", or why there is none."""
    return f"{_mde_text(mde)} pp" if math.isfinite(mde) else "not computable (nothing varied: no test)"


def _primary_section(accuracy: pd.DataFrame, primary: pd.DataFrame, settings: StatsSettings) -> list[str]:
    margin = f"±{settings.equivalence_margin_pp:g} pp"
    lines = [
        "## Per-shot comparisons (secondary family)",
        "",
        f"Per experiment: {', '.join(_comparison_label(c) for c in settings.per_shot_comparisons)} at every shot "
        f"count, pooled; Holm-adjusted within the experiment's per-shot family only (not confirmatory). Verdict: "
        "*better*/*worse* when "
        f"the difference test is significant (Holm p < {settings.alpha:g}), *equivalent* when TOST concludes "
        f"equivalence within {margin} (Holm-adjusted TOST p < {settings.alpha:g}), otherwise *inconclusive*. "
        f"MDE: the smallest true difference detectable with 80% power at alpha/m (m = family size), from the "
        f"observed standard error and the t quantiles of the test's own df (n/a where nothing varied); power: "
        f"that test's power at the target effect of {settings.target_effect_pp:g} pp. Accuracy in %, "
        f"{settings.ci_level:.0%} intervals (truncated to the possible range; exact Clopper–Pearson over the problems "
        "where every outcome is 0 or 1), differences in percentage points (pp) with intervals simultaneous over the "
        f"family (Bonferroni: each at 1 − {1 - settings.ci_level:.2g}/m, so one excludes 0 only where Holm rejects; "
        "Newcombe's interval where nothing varied).",
        "",
    ]
    if primary.empty:
        return [*lines, "No per-shot comparison could be made (FOMAML and SFT or Base missing).", ""]
    for experiment in _experiments(primary):
        rows = primary[primary["experiment"] == experiment].sort_values(["shots", "comparison"])
        pool = rows["task"].iloc[0]
        lines += [f"### Experiment `{experiment}`: {_pool_text(pool, accuracy, experiment)}", ""]
        lines += [*_accuracy_table(accuracy, experiment, pool), ""]
        body = []
        for row in rows.itertuples(index=False):
            verdict = "equivalent within " + margin if row.verdict == "equivalent" else VERDICTS[row.verdict]
            if row.verdict in ("better", "worse") and row.equivalent:
                verdict += f" (but within {margin})"
            body.append(
                [
                    str(int(row.shots)),
                    _comparison_label(row.comparison),
                    _family_interval(row),
                    fmt_p(row.acc_p_holm, row.acc_stars),
                    fmt_p(row.tost_p_holm),
                    verdict,
                    _mde_text(row.mde),
                    fmt_percent(row.power_at_target),
                    f"{row.ci_method} ({int(row.n_seeds_a)}/{int(row.n_seeds_b)} seeds)",
                ]
            )
        header = ["Shots", "Comparison", "Difference (pp, simultaneous)", "p (Holm)", "TOST p (Holm)", "Verdict",
                  "MDE (pp)"]  # fmt: skip
        lines += [*_table([*header, f"Power at {settings.target_effect_pp:g} pp (%)", "Interval"], body), ""]
        notes = []
        blocked = rows[~rows["acc_can_reach_alpha"].astype(bool)]
        for row in blocked.itertuples(index=False):
            notes.append(
                f"- Cannot reach alpha: {_comparison_label(row.comparison)} at {row.shots} shots "
                f"(smallest achievable Holm p {row.acc_min_p_holm:.3g} ≥ {settings.alpha:g})."
            )
        no_equivalence = rows[~rows["tost_can_reach_alpha"].astype(bool)]
        if len(no_equivalence):
            which = "every comparison" if len(no_equivalence) == len(rows) else f"{len(no_equivalence)} comparison(s)"
            notes.append(
                f"- Equivalence within {margin} cannot be concluded for {which}: even an estimate of exactly 0 "
                f"would leave the Holm-adjusted TOST p ≥ {settings.alpha:g} (smallest reachable: "
                f"{no_equivalence['tost_min_p_holm'].min():.3g}); the standard errors are too large for the margin."
            )
        notes += [f"- Intervals without seed variance: {note}." for note in sorted(set(rows["seed_note"]) - {""})]
        lines += [*notes, ""] if notes else []
    return lines


def _rule_adoption_lines(table: pd.DataFrame | None, settings: StatsSettings) -> list[str]:
    """The positive control: the share of answers that use the evaluated task's own rule, per init and k, on each
    experiment's held-out pool (else its in-domain pool), against the base's 0-shot share."""
    lines = ["## Positive control: rule adoption", ""]
    if table is None:
        return [*lines, "Not computed (no `rule_adoption.tsv`).", ""]
    if table.empty:
        return [
            *lines,
            "Does not apply: no evaluated task has a synthetic hidden rule (real MATH tasks have none).",
            "",
        ]
    lines += [
        "Share of answers that use the evaluated task's own hidden rule: the extracted answer is an integer whose "
        "units digit is the task's digit (a missing answer counts as not following it). Against the base model's "
        f"0-shot share on the same problems: seed-aware t-test, {settings.ci_level:.0%} intervals (unadjusted; exact "
        "Clopper–Pearson where every answer follows or none does, Newcombe's for such a difference), Holm over the "
        "pool's (init, k > 0) comparisons; detected: Holm p < "
        f"{settings.alpha:g} and a higher share. Shares in %, differences in pp.",
        "",
    ]
    for experiment in _experiments(table):
        rows = table[table["experiment"] == experiment]
        pool = META_TEST_POOL if (rows["pool"] == META_TEST_POOL).any() else IN_DOMAIN_POOL
        rows = rows[rows["pool"] == pool]
        pools = task_order(list(table.loc[table["experiment"] == experiment, "pool"].unique()))
        held = [t for t in pools if t not in (META_TEST_POOL, IN_DOMAIN_POOL, POOLED)]
        where = f"held-out task(s) {', '.join(held)} pooled" if pool == META_TEST_POOL else "in-domain tasks pooled"
        reference = rows["base_share_0"].dropna()
        base_text = fmt_percent(float(reference.iloc[0])) + "%" if len(reference) else "n/a (no base 0-shot rows)"
        lines += [f"### `{experiment}`: {where}; Base 0-shot share {base_text}", ""]
        body = []
        for row in rows.itertuples(index=False):
            body.append(
                [
                    init_label(row.init),
                    str(int(row.shots)),
                    _interval(fmt_percent, row.share, row.share_ci_low, row.share_ci_high),
                    _interval(fmt_points, row.diff, row.diff_ci_low, row.diff_ci_high) if row.shots > 0 else "–",
                    fmt_p(row.p_holm) if row.shots > 0 else "–",
                    ("**yes**" if bool(row.detected) else "no") if row.shots > 0 else "–",
                ]
            )
        header = ["Init", "Shots", "Share (%)", "− Base 0-shot (pp)", "p (Holm)", "Detected"]
        lines += [*_table(header, body), ""]
        detected = rows[rows["detected"].astype(bool)]
        inits = init_order(list(detected["init"].unique()))
        place = "on the held-out tasks" if pool == META_TEST_POOL else "on the in-domain tasks"
        if inits:
            named = "; ".join(
                f"{init_label(i)} (k = {', '.join(str(int(k)) for k in detected.loc[detected['init'] == i, 'shots'])})"
                for i in inits
            )
            lines.append(
                f"**Positive control detected** {place}: {named} use(s) the task's rule more often than the base "
                "model at 0 shots."
            )
        else:
            lines.append(
                f"**Positive control not detected** {place}: no initialisation uses the task's rule significantly "
                "more often than the base model at 0 shots."
            )
        lines.append("")
    return lines


def _positive_control_lines(table: pd.DataFrame | None, settings: StatsSettings) -> list[str]:
    """Secondary: each init's accuracy gain at the largest k over its own 0-shot accuracy."""
    lines = ["## Secondary positive control: accuracy gain", ""]
    if table is None or table.empty:
        return [*lines, "Not computed (no 0-shot and k-shot evaluations of the same initialisation).", ""]
    lines += [
        "Secondary to rule adoption (above): accuracy also needs the arithmetic, and 0-shot accuracy can be 0 for "
        "reasons unrelated to the rule (e.g. no answer written). Gain in accuracy at the largest shot count over "
        "the same initialisation's 0-shot accuracy, paired by problem within training seeds (seed-aware "
        "t-interval, unadjusted; Newcombe's where nothing varied), Holm-adjusted over the rows.",
        "",
        "| Experiment | Tasks | Init | Shots | 0-shot | k-shot | Gain (pp) | p (Holm) | Detected |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table.itertuples(index=False):
        tasks = "held-out" if row.pool == META_TEST_POOL else "all"
        gain = _interval(fmt_points, row.gain, row.gain_ci_low, row.gain_ci_high)
        lines.append(
            f"| {row.experiment} | {tasks} | {init_label(row.init)} | {int(row.shots)} | "
            f"{fmt_percent(row.acc_0)} | {fmt_percent(row.acc_k)} | {gain} | {fmt_p(row.p_holm)} | "
            f"{'**yes**' if bool(row.detected) else 'no'} |"
        )
    held_out = table[table["pool"] == META_TEST_POOL]
    focus = held_out if not held_out.empty else table
    detected = [init_label(i) for i in focus.loc[focus["detected"].astype(bool), "init"]]
    where = "on the held-out tasks" if not held_out.empty else "over all tasks"
    verdict = (
        f"**Accuracy gain detected** {where}: {', '.join(detected)} improve(s) with k (Holm p < {settings.alpha:g})."
        if detected
        else f"**No accuracy gain detected** {where}: no initialisation improves significantly with k."
    )
    return [*lines, "", verdict, ""]


def _control_lines(control: pd.DataFrame | None, aa: pd.DataFrame | None, settings: StatsSettings) -> list[str]:
    lines = ["## Negative control (A/A)", "", *_pair_lines(control, settings)]
    return [*lines, *_split_lines(aa, settings), ""]


def _pair_lines(control: pd.DataFrame | None, settings: StatsSettings) -> list[str]:
    """The pre-defined A/A pair: one model under the main and the control shot seed."""
    if control is None or control.empty:
        return ["No negative control was run (no `--control-eval` files given to the stats stage)."]
    first = control.iloc[0]
    if control["acc_p_holm"].isna().all():  # nothing varied between the two draws' outcomes: no test possible
        return [
            f"Not testable: {init_label(first['init'])} (experiment `{first['experiment']}`) gave identical "
            "outcomes under both shot seeds on every problem (no variation; see docs/statistics.md)."
        ]
    worst = control.loc[control["acc_p_holm"].idxmin()]
    what = (
        f"{init_label(first['init'])} (experiment `{first['experiment']}`, training seed {first['train_seed']}) "
        f"evaluated under shot seeds {first['main_shot_seed']} and {first['control_shot_seed']}, "
        f"shots {', '.join(str(int(k)) for k in control['shots'])}: largest |difference| "
        f"{100 * control['acc_diff'].abs().max():.1f} pp, smallest Holm p {fmt_p(worst['acc_p_holm'])}"
    )
    if control["significant"].any():
        line = (
            f"**Warning**: the pipeline finds a difference where none exists: {what} (< {settings.alpha:g}). "
            "Intervals that condition on one set of shot draws are too narrow for this design."
        )
    else:
        line = f"The pipeline finds no difference where none exists: {what} (≥ {settings.alpha:g})."
    return [line, *(f"- {n}" for n in sorted(set(control["note"].astype(str)) - {""}))]


def _split_lines(aa: pd.DataFrame | None, settings: StatsSettings) -> list[str]:
    """The A/A split re-analyses (aa_control.tsv): a line for the draw splits, one per experiment for the seed
    splits."""
    if aa is None or aa.empty:
        return []
    lines = ["", f"A/A splits (`aa_control.tsv`): the share of splits rejected at α = {settings.alpha:g}."]
    draws = aa[aa["control"] == "draws"]
    if len(draws):
        first = draws.iloc[0]
        what = f"{init_label(first['init'])} (seed {first['train_seeds']}), its control draws"
        if first["note"]:
            lines.append(f"- Draw splits of {what}: not run, {first['note']}.")
        else:
            rates = "; ".join(f"k = {r.shots}: {_share_text(r)}" for r in draws.itertuples(index=False))
            lines.append(
                f"- Draw splits of {what} ({_halves_text(first)}): {rates}. The splits share draws: the rate is "
                "conditional on these draws."
            )
    seeds = aa[aa["control"] == "seeds"]
    for experiment in _experiments(seeds):
        rows = seeds[seeds["experiment"] == experiment]
        first = rows.iloc[0]
        if first["note"]:
            lines.append(f"- Seed splits (`{experiment}`): not run, {first['note']}.")
            continue
        arms = "; ".join(f"{init_label(r.init)} {_share_text(r)}" for r in rows.itertuples(index=False))
        lines.append(f"- Seed splits (`{experiment}`, primary analysis, {_halves_text(first)}): {arms}.")
    return lines


def _halves_text(row: pd.Series) -> str:
    half = int(row["half_size"])
    return f"{int(row['n_units'])} {row['control']} split {half} vs {int(row['n_units']) - half}"


def _share_text(row: Any) -> str:
    """'2 of all 35 splits reject (5.7%)', with the Monte Carlo SE when the splits were sampled."""
    if row.exhaustive:
        return f"{int(row.n_rejected)} of all {int(row.n_splits)} splits reject ({fmt_pct(row.false_positive_rate)})"
    return (
        f"{int(row.n_rejected)} of {int(row.n_splits)} random splits reject ({fmt_pct(row.false_positive_rate)} "
        f"± {fmt_percent(row.false_positive_rate_mc_se)})"
    )


def _held_out_lines(accuracy: pd.DataFrame, comparisons: pd.DataFrame) -> list[str]:
    lines = ["## Held-out tasks", ""]
    rows = accuracy[(accuracy["task_role"] == "meta_test") & (accuracy["train_seed"] == ALL_SEEDS)]
    if rows.empty:
        return [*lines, "No experiment holds out tasks (every evaluated task was meta-trained on).", ""]
    for experiment in _experiments(rows):
        held = rows[rows["experiment"] == experiment]
        tasks = [t for t in task_order(list(held["task"].unique())) if t != POOLED]
        lines += [f"### `{experiment}`", ""]
        for task in tasks:
            title = "held-out tasks pooled" if task == META_TEST_POOL else task_label(task)
            lines += [f"{title}:", "", *_accuracy_table(accuracy, experiment, task), ""]
        cmp = comparisons[
            (comparisons["experiment"] == experiment)
            & (comparisons["task"].isin([t for t in tasks if t != META_TEST_POOL]))
        ]
        for row in cmp.sort_values(["task", "shots"]).itertuples(index=False):
            lines.append(
                f"- {task_label(row.task)}, {row.shots} shots, {_comparison_label(row.comparison)}: "
                f"{_family_interval(row)} pp (simultaneous), "
                f"p (Holm, secondary) {fmt_p(row.acc_p_holm, row.acc_stars)}"
            )
        lines.append("")
    return lines


def _metaloop_lines(comparisons: pd.DataFrame) -> list[str]:
    """The secondary row against FOMAML's primary row, per experiment, pool and k (empty when it was not run)."""
    name = comparison_name(*SECONDARY_COMPARISONS[0])
    rows = comparisons[(comparisons["comparison"] == name) & comparisons["task"].isin([META_TEST_POOL, POOLED])]
    if rows.empty:
        return []
    lines = [
        f"## Secondary: {init_label(METALOOP)}",
        "",
        f"{_comparison_label(name)}: FOMAML's weights at each k adapted with the inner loop they were meta-trained "
        "with (fomaml.inner_optimizer, inner_lr, num_inner_steps, one mini-batch of inner_batch_size shots per step) "
        "instead of the tuned adaptation; the same shots and test problems, paired by problem (docs/evaluation.md). "
        "Secondary family (Holm within the experiment's secondary family); not part of the primary contrast.",
        "",
    ]
    body = [
        [
            row.experiment,
            "held-out tasks pooled" if row.task == META_TEST_POOL else task_label(row.task),
            str(int(row.shots)),
            _family_interval(row),
            fmt_p(row.acc_p_holm, row.acc_stars),
            row.verdict,
        ]
        for row in rows.itertuples(index=False)
    ]
    header = ["Experiment", "Pool", "Shots", "Difference (pp, simultaneous)", "p (Holm)", "Verdict"]
    return [*lines, *_table(header, body), ""]


def _generation_lines(generation: pd.DataFrame | None) -> list[str]:
    lines = ["## Generation", ""]
    if generation is None or generation.empty:
        return [*lines, "No generation table (`generation.tsv`).", ""]
    body = [
        [
            row.experiment,
            init_label(row.init),
            str(int(row.shots)),
            fmt_percent(row.no_answer_rate),
            fmt_percent(row.truncation_rate),
            "n/a" if not math.isfinite(row.mean_gen_tokens) else f"{row.mean_gen_tokens:.0f}",
        ]
        for row in generation.itertuples(index=False)
    ]
    header = ["Experiment", "Init", "Shots", "No answer (%)", "Truncated (%)", "Mean generated tokens"]
    return [*lines, *_table(header, body), ""]


def _text(value: object) -> str:
    """A text cell; "n/a" where the table has none (``read_table`` reads the text "n/a" back as NaN)."""
    return value if isinstance(value, str) and value else "n/a"


def _adaptation_lines(adaptation: pd.DataFrame | None) -> list[str]:
    lines = ["## Adaptation effect", ""]
    if adaptation is None or adaptation.empty:
        return [*lines, "No k-shot adaptation was evaluated (0 shots only).", ""]
    lines += [
        "Means over training seeds × tasks × repeats. NLL change: test-gold NLL after adaptation minus the same "
        "init's 0-shot NLL (per problem); outputs changed: share of greedy outputs that differ from 0-shot.",
        "",
    ]
    body = []
    for row in adaptation.itertuples(index=False):
        body.append(
            [
                row.experiment,
                init_label(row.init),
                str(int(row.shots)),
                _text(row.adapt_choices),
                f"{fmt_nll(row.support_loss_before)} → {fmt_nll(row.support_loss_after)}",
                f"{fmt_nll_diff(row.nll_change)} ({fmt_pct(row.nll_change_rel, fmt_points)})",
                "n/a" if not math.isfinite(row.weight_change) else f"{row.weight_change:.2e}",
                fmt_percent(row.outputs_changed) + (" ⚠" if row.low_change else ""),
            ]
        )
    header = [
        "Experiment",
        "Init",
        "Shots",
        "Optimizer",
        "Support loss",
        "NLL change",
        "‖Δw‖/‖w‖",
        "Outputs changed (%)",
    ]
    lines += [*_table(header, body), ""]
    flagged = adaptation[adaptation["low_change"].astype(bool)]
    for row in flagged.itertuples(index=False):
        lines.append(
            f"- **Near no-op adaptation**: {init_label(row.init)} at {row.shots} shots (`{row.experiment}`) "
            f"changed {fmt_pct(row.outputs_changed)} of outputs (< 1%)."
        )
    return [*lines, ""] if len(flagged) else lines


def _seed_text(seed: int) -> str:
    return "–" if seed < 0 else str(seed)  # -1: the untrained base, one model for every seed


def _criterion_text(criterion: str, value: float) -> str:
    return f"{criterion} {fmt_pct(value)}" if criterion == "accuracy" else f"{criterion} {fmt_nll(value)}"


def _rho(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f}"


_EDGE_WORDS = {"lr": "rate", "num_steps": "step count"}


def _grid_edge_lines(
    calibration: dict[str, pd.DataFrame] | None, primary: pd.DataFrame | None, settings: StatsSettings
) -> list[str]:
    """One line qualifying the Answer per experiment where a primary arm's tuned choices (k > 0) sit at an edge
    of the tuning grid in more than half of its runs: its optimum may lie outside the grid ('' otherwise)."""
    if calibration is None or calibration["chosen"].empty:
        return []
    arms = settings.primary_contrast.split("-")
    # The primary's experiments and "" (a base tuned once for all of them); no primary table: every experiment.
    experiments = None if primary is None or primary.empty else [*primary["experiment"].unique(), ""]
    flagged = [r for r in edge_runs(calibration["chosen"], arms, experiments) if 2 * r.at_edge > r.runs]
    lines = []
    for experiment in experiment_order(list(dict.fromkeys(r.experiment for r in flagged))):
        parts = []
        for row in sorted((r for r in flagged if r.experiment == experiment), key=lambda r: arms.index(r.init)):
            named = ", ".join(
                f"{end} {_EDGE_WORDS.get(axis, axis)} in {count}"
                for (axis, _, end), count in ((edge.partition(":"), count) for edge, count in row.edges.items())
            )
            cap = f"; {row.capped} stopped at the grid-extension cap" if row.capped else ""
            parts.append(f"{init_label(row.init)} in {row.at_edge} of {row.runs} runs ({named}{cap})")
        lines.append(
            f"- **Tuned at a grid edge** (`{experiment or 'shared'}`): the adaptation the tuner chose sits at an edge "
            f"of its grid for {'; '.join(parts)}. The best adaptation may lie outside the grid, so this contrast "
            "compares arms that may be under-tuned by different amounts (see Tuning below)."
        )
    return [*lines, ""] if lines else []


def _calibration_lines(calibration: dict[str, pd.DataFrame] | None) -> list[str]:
    lines = ["## Tuning (checkpoint and adaptation) and adaptation speed", ""]
    if calibration is None or calibration["chosen"].empty:
        return [
            *lines,
            "No calibration files given (`--calibration`): neither the checkpoint nor the adaptation was tuned.",
            "",
        ]
    orders = {"init": init_order(list(calibration["chosen"]["init"].unique())),
              "experiment": experiment_order(list(calibration["chosen"]["experiment"].unique()))}  # fmt: skip
    chosen = sort_in_order(calibration["chosen"], ["experiment", "init", "train_seed", "shots"], orders)
    lines += [
        "Per initialisation, training seed and tuned shot count k, the tuner chose the kept checkpoint (training "
        "step) and the adaptation (learning rate, steps) jointly on the tuning tasks' dev data (an experiment's "
        "meta_val tasks, else its training tasks; never a held-out task), by the criterion "
        "shown (accuracy: highest; NLLs: lowest); at 0 shots only the checkpoint. Dev accuracy (%) and dev NLL: "
        "the checkpoint unadapted → at the choice. Adaptation speed: steps until the dev NLL at the chosen rate "
        "has made 90% of its largest reduction (n/a: it never falls). One row per training seed; rates are never "
        "averaged.",
        "",
        *(
            f"Tuning tasks of `{experiment or 'shared'}`: {', '.join(tasks.split(',')) if tasks else 'not recorded'}."
            for experiment, tasks in chosen[["experiment", "tasks"]].drop_duplicates().itertuples(index=False)
        ),
        "",
    ]
    body = [
        [
            init_label(row.init),
            row.experiment or "shared",
            _seed_text(int(row.train_seed)),
            str(int(row.shots)),
            str(int(row.checkpoint)),
            row.optimizer,
            "–" if int(row.shots) == 0 else f"{row.lr:.3g}",
            str(int(row.num_steps)),
            _criterion_text(row.criterion, row.criterion_value),
            f"{fmt_percent(row.accuracy_before)} → {fmt_percent(row.accuracy)}",
            f"{fmt_nll(row.nll_before)} → {fmt_nll(row.nll)}",
            "n/a" if math.isnan(row.steps_to_90) else f"{row.steps_to_90:g} of {int(row.curve_steps)}",
        ]
        for row in chosen.itertuples(index=False)
    ]
    header = ["Init", "Experiment", "Seed", "k", "Checkpoint", "Optimizer", "lr", "Steps", "Criterion",
              "Dev accuracy (%)", "Dev NLL", "Steps to 90%"]  # fmt: skip
    lines += [*_table(header, body), ""]
    edges = chosen[chosen["edges"].astype(str) != ""]
    for row in edges.itertuples(index=False):
        axes = [edge.split(":")[0] for edge in str(row.edges).split(";")]
        grids = ", ".join(f"`calibration.{'lr_grid' if axis == 'lr' else 'steps_grid'}`" for axis in axes)
        named = {"lr": "rate", "num_steps": "step count"}
        note = row.edge_note or ", ".join(
            f"the {end} {named.get(axis, axis)}"
            for axis, _, end in (e.partition(":") for e in str(row.edges).split(";"))
        )
        seed = f", seed {row.train_seed}" if int(row.train_seed) >= 0 else ""
        lines.append(
            f"- **At the grid's edge**: {init_label(row.init)} ({row.experiment or 'shared'}{seed}, "
            f"k = {int(row.shots)}): {note} ({grids})."
        )
    if len(edges):
        lines.append("")
    return lines + _agreement_lines(calibration.get("agreement"), orders)


def _agreement_lines(agreement: pd.DataFrame | None, orders: dict[str, list[str]]) -> list[str]:
    if agreement is None or agreement.empty:
        return []
    rows = agreement[agreement["group"].astype(str) == "all"]
    if rows.empty:
        return []
    rows = sort_in_order(rows, ["experiment", "init", "train_seed"], orders)
    lines = [
        "### Criterion agreement",
        "",
        "Spearman's ρ over the tuning grid (every checkpoint, k > 0, rate and step count) between each criterion "
        "(oriented so higher is better) and dev accuracy: how far the criterion ranks the candidates as accuracy "
        "does; the tuner's criterion in bold. Accuracy against itself is 1 by construction; split-half is dev "
        "accuracy's own ρ between the even- and odd-indexed dev examples, the noise ceiling of any criterion "
        "(n/a: undefined, e.g. accuracy constant over the grid).",
        "",
    ]
    body = []
    for row in rows.itertuples(index=False):
        cells = [f"**{_rho(getattr(row, c))}**" if c == row.criterion else _rho(getattr(row, c))
                 for c in ("accuracy", "answer_nll", "nll")]  # fmt: skip
        body.append([init_label(row.init), row.experiment or "shared", _seed_text(int(row.train_seed)), row.criterion,
                     *cells, _rho(row.split_half)])  # fmt: skip
    header = ["Init", "Experiment", "Seed", "Criterion", "ρ accuracy", "ρ answer NLL", "ρ NLL", "Split-half ρ"]
    return [*lines, *_table(header, body), ""]


def _efficiency_lines(efficiency: pd.DataFrame | None) -> list[str]:
    lines = ["## Sample efficiency", ""]
    if efficiency is None or efficiency.empty:
        return [*lines, "Not computed (an initialisation with at least two shot counts and a reference needed).", ""]
    lines += [
        "Only evaluated shot counts are claimed: nothing below the first evaluated k > 0, and a value between two "
        "evaluated k > 0 is marked interpolated, with the two beside it.",
        "",
    ]
    for row in efficiency.itertuples(index=False):
        lines.append(
            f"- `{row.experiment}`: {init_label(row.learner)} reaches {init_label(row.reference)}'s "
            f"{row.reference_shots}-shot accuracy ({fmt_pct(row.target_accuracy)}) "
            + _reached_text(row)
            + f" [{fmt_shots(row.ci_low)}, {fmt_shots(row.ci_high)}] "
            f"(measured up to {row.learner_max_shots}; not reached in {100 * row.share_not_reached:.0f}% of bootstrap "
            "replicates)"
        )
    return [*lines, ""]


def _reached_text(row: Any) -> str:
    """Where the learner reaches the target, in evaluated k (sample_efficiency.tsv; older tables: the point)."""
    if not math.isfinite(row.shots_to_match):
        return f"at no measured shot count (> {row.learner_max_shots})"
    reached = getattr(row, "shots_reached", math.nan)
    if not math.isfinite(reached):
        return f"at {fmt_shots(row.shots_to_match)} shots"
    if bool(getattr(row, "interpolated", False)):
        return (
            f"between the evaluated k = {row.shots_before:g} and {reached:g} (interpolated "
            f"{fmt_shots(row.shots_to_match)} shots)"
        )
    if reached == 0:
        return "already at 0 shots"
    before = "" if not math.isfinite(row.shots_before) else f", not yet at k = {row.shots_before:g}"
    return f"by the evaluated k = {reached:g}{before}"


def _exploratory_lines(comparisons: pd.DataFrame, across: pd.DataFrame, settings: StatsSettings) -> list[str]:
    lines = [
        "## Exploratory: per task (secondary family)",
        "",
        "Not confirmatory: every per-task and non-primary comparison, Holm-adjusted within its experiment's "
        "secondary family; each interval simultaneous over that family (Bonferroni at its size m).",
        "",
    ]
    rows = comparisons[(comparisons["family"] == "secondary") & ~comparisons["task"].isin([POOLED, META_TEST_POOL])]
    body = [
        [
            row.experiment,
            task_label(row.task),
            str(int(row.shots)),
            _comparison_label(row.comparison),
            _family_interval(row),
            fmt_p(row.acc_p_holm, row.acc_stars),
            "" if row.acc_can_reach_alpha else "cannot reach alpha",
        ]
        for row in rows.itertuples(index=False)
    ]
    header = ["Experiment", "Task", "Shots", "Comparison", "Difference (pp, simultaneous)", "p (Holm)", "Note"]
    lines += [*_table(header, body), ""]
    if len(across):
        lines += [
            "Cross-task analysis (tasks a random sample of subjects: t-test over the per-task differences plus the "
            "seed spread, Holm within the experiment; intervals unadjusted):",
            "",
        ]
        for row in across.itertuples(index=False):
            text = (
                f"- `{row.experiment}`, {_comparison_label(row.comparison)}, {row.shots} shots: mean over tasks "
                f"{_interval(fmt_points, row.acc_macro_diff, row.acc_macro_ci_low, row.acc_macro_ci_high)} pp, "
                f"p (Holm) {fmt_p(row.acc_p_holm, row.acc_stars)}; positive in {row.acc_n_positive} of {row.n_tasks} "
                f"tasks, Wilcoxon over tasks p {fmt_p(row.acc_wilcoxon_p)}"
            )
            if not row.acc_wilcoxon_can_reach_alpha:
                text += f" (cannot reach alpha: smallest Holm p {row.acc_wilcoxon_min_p_holm:.3g})"
            lines.append(text)
        lines.append("")
    return lines


PER_TASK_FILE = "results/stats/per_task.md"


def render_per_task(tables: dict[str, pd.DataFrame | None], settings: StatsSettings) -> str:
    """The Markdown of ``per_task.md``: the per-task detail, kept out of ``summary.md`` so that it reads in a minute."""
    lines = ["# Per task: every task's comparisons and the cross-task analysis", ""]
    lines += _exploratory_lines(tables["comparisons.tsv"], tables["across_tasks.tsv"], settings)
    return "\n".join(lines)


def render_summary(
    tables: dict[str, pd.DataFrame | None], settings: StatsSettings, calibration: dict[str, pd.DataFrame] | None = None
) -> str:
    """The Markdown text of ``summary.md`` from the stats tables (missing optional tables: None)."""
    accuracy, comparisons = tables["accuracy.tsv"], tables["comparisons.tsv"]
    per_shot = comparisons[comparisons["family"] == "per_shot"]
    seeds = accuracy.loc[accuracy["train_seed"] == ALL_SEEDS, "n_seeds"]
    lines = [
        "# FOMAML vs SFT on MATH: results",
        "",
        f"Experiments: {', '.join(f'`{e}`' for e in _experiments(accuracy))}; training seeds per trained model: "
        f"{int(seeds.max()) if len(seeds) else 0}. Stars: Holm-adjusted p < {settings.alpha:g} (*), < 0.01 (**), "
        "< 0.001 (***).",
        "",
    ]
    if len(seeds) and seeds.max() < 2:
        lines += ["One training seed: intervals and tests cover test-problem sampling only, not training variance.", ""]
    lines += _answer_lines(tables.get("primary.tsv"), tables.get("planted.tsv"), settings)
    lines += _grid_edge_lines(calibration, tables.get("primary.tsv"), settings)  # qualifies the Answer
    lines += _primary_section(accuracy, per_shot, settings)
    lines += _rule_adoption_lines(tables.get("rule_adoption.tsv"), settings)
    lines += _positive_control_lines(tables.get("positive_control.tsv"), settings)
    lines += _control_lines(tables.get("control.tsv"), tables.get("aa_control.tsv"), settings)
    lines += _held_out_lines(accuracy, comparisons)
    lines += _metaloop_lines(comparisons)
    lines += _generation_lines(tables.get("generation.tsv"))
    lines += _adaptation_lines(tables.get("adaptation_summary.tsv"))
    lines += _calibration_lines(calibration)
    lines += _efficiency_lines(tables.get("sample_efficiency.tsv"))
    lines += [
        "## Per task",
        "",
        f"Every per-task comparison (exploratory, secondary family) and the cross-task analysis: `{PER_TASK_FILE}`.",
        "",
        "## Method",
        "",
        "- Unit: the test problem; correctness averaged over the repeats (shot draws), then over training seeds.",
        "- Intervals and tests with two or more training seeds: t-interval from a crossed seeds × problems variance "
        "(seed part from the spread of per-seed means, S − 1 df; problem part within tasks), Welch–Satterthwaite "
        f"df; with one seed: percentile bootstrap over problems ({settings.bootstrap_samples} resamples, seed "
        f"{settings.seed}) and the exact McNemar test.",
        f"- Equivalence: TOST within ±{settings.equivalence_margin_pp:g} pp with the same standard error.",
        "- Where nothing varied (every outcome 0, or every outcome 1): Clopper–Pearson over the problems for an "
        "accuracy, Newcombe's hybrid score for a difference, and no test. A difference beside a Holm verdict: its "
        "interval simultaneous over the family (Bonferroni at the family size); elsewhere labelled unadjusted.",
        "- Families: the primary contrast (one test per experiment, Holm over the experiments); per-shot (pooled, per "
        "experiment) and secondary (everything else), both exploratory; cross-task, the negative control, the "
        "rule-adoption control (per experiment and pool) and the accuracy-gain control; each Holm-adjusted on its own.",
        "- Full tables in `results/stats/`; definitions in `docs/statistics.md`.",
        "",
    ]
    return "\n".join(lines)


def read_tables(stats_dir: Path) -> tuple[dict[str, pd.DataFrame | None], list[str]]:
    """The required tables, and the optional ones when present (a note for each one missing)."""
    tables: dict[str, pd.DataFrame | None] = {
        name: read_table(stats_dir, name) for name in ("accuracy.tsv", "comparisons.tsv", "across_tasks.tsv")
    }
    notes = []
    for name in OPTIONAL_TABLES:
        if (stats_dir / name).is_file():
            tables[name] = read_table(stats_dir, name)
        else:
            tables[name] = None
            notes.append(f"summary: {stats_dir / name} not found; its section says so")
    return tables, notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fomaml_math summary", description="Write the study's results summary (Markdown)."
    )
    add_settings_arguments(parser)
    parser.add_argument("--stats-dir", required=True, type=Path, help="folder with the stats stage's tables")
    parser.add_argument(
        "--calibration", nargs="*", default=[], type=Path, metavar="JSON", help="calibration results (optional)"
    )
    parser.add_argument("--output", required=True, type=Path, help="results/summary.md")
    parser.add_argument(
        "--per-task-output", type=Path, default=None, help="the per-task detail (default: <stats-dir>/per_task.md)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = StatsSettings.from_settings(settings_from_args(args, "summary"))
    tables, notes = read_tables(args.stats_dir)
    calibration = load_calibration(args.calibration) if args.calibration else None
    for note in notes:
        print(note)
    per_task = args.per_task_output or args.stats_dir / "per_task.md"
    write_text(per_task, render_per_task(tables, settings))
    write_text(args.output, render_summary(tables, settings, calibration))
    print(f"summary: {args.output}, per task: {per_task}")
    return 0
