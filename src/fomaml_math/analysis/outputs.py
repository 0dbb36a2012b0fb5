"""The analysis stages' output names, importable without pandas, scipy or matplotlib.

The Snakefile reads them to declare the rules' outputs: importing the stage modules there would add
seconds to every Snakemake start (dry runs included).
"""

from __future__ import annotations

STATS_FILES: tuple[str, ...] = (
    "accuracy.tsv",
    "comparisons.tsv",
    "primary.tsv",
    "per_shot.tsv",
    "planted.tsv",
    "across_tasks.tsv",
    "control.tsv",
    "aa_control.tsv",
    "generation.tsv",
    "adaptation.tsv",
    "adaptation_summary.tsv",
    "sample_efficiency.tsv",
    "rule_adoption.tsv",
    "positive_control.tsv",
)
FIGURES: tuple[str, ...] = (
    "accuracy_vs_shots",
    "accuracy_vs_shots_by_task",
    "gain_heatmap",
    "nll_vs_shots",
    "training_curves",
    "calibration",
    "rule_adoption_vs_shots",
)
