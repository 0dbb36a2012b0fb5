"""The HTML report's front page and captions (workflow/report/*.rst), rendered as Snakemake renders them (Jinja2,
then docutils) with the demo's config: every caption renders, and none names a method the analysis no longer uses
or one it uses only in a branch the sentence does not name."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest
from docutils.core import publish_parts

from fomaml_math.analysis.figures import FIGURES
from fomaml_math.analysis.outputs import STATS_FILES
from fomaml_math.config import load_config

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "workflow" / "report"
ANALYSIS = ROOT / "src" / "fomaml_math" / "analysis"

# A method a caption may name -> a call that shows the analysis still uses it (searched in analysis/*.py, a
# definition alone does not count).
METHODS = {
    r"McNemar": r"mcnemar_exact\(",
    r"Wilcoxon": r"wilcoxon_test\(",
    r"percentile[- ]bootstrap": r"percentile_interval\(",
    r"bootstrap": r"stratified_bootstrap\(|_replicates\(",
    r"Clopper": r"clopper_pearson\(",
    r"Wilson": r"wilson\(",
    r"Newcombe": r"newcombe_difference\(",
    r"Bonferroni|simultaneous": r"simultaneous_level\(|simultaneous_difference\(",
    r"TOST": r"tost\(",
    r"Holm": r"holm_adjust\(",
    r"Welch": r"welch_satterthwaite\(",
    r"permutation": r"perm_p|permut",
    r"t-interval|t-test": r"t_interval\(",
}
# Methods the analysis uses only with one training seed (or, for Wilcoxon, descriptively over tasks): a sentence
# that names one must name that branch, or it describes another study than the demo's (3 seeds).
ONE_SEED_ONLY = {
    r"McNemar": r"one (training )?seed",
    r"Wilcoxon": r"one (training )?seed|(over|across) tasks",
    r"percentile[- ]bootstrap": r"one (training )?seed",
}
# Descriptions of an older study: never again.
RETIRED = {
    r"drawn from the task's support": "the k shots come from dev_pool (docs/data.md)",
    r"over all tests of a metric": "each family is Holm-adjusted on its own (docs/statistics.md)",
    r"\(S − 1\)\s*\(N − 1\)|problem-level df": "no switch to problem-level df (docs/statistics.md)",
    r"labels of whole training runs permuted": "the planted check simulates whole studies",
}


def render(text: str, config: dict) -> str:
    """As snakemake.report does: Jinja2 (trim_blocks, lstrip_blocks; undefined names are errors here) with a
    ``snakemake`` object holding the config and the wildcards (training_metrics.rst reads ``method``)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    snakemake = SimpleNamespace(config=config, wildcards=SimpleNamespace(method="fomaml"))
    return env.from_string(text).render(snakemake=snakemake, categories={}, files={})


def sentences(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [s for s in re.split(r"(?<=\.)\s+(?=[A-Z`*(])", flat) if s]


def used(pattern: str) -> bool:
    sources = "\n".join(p.read_text() for p in ANALYSIS.glob("*.py"))
    calls = [m for m in re.finditer(pattern, sources) if sources[max(0, m.start() - 4) : m.start()] != "def "]
    return bool(calls)


def problems(text: str) -> list[str]:
    """What a rendered caption says that the analysis does not do (empty: nothing)."""
    found = []
    for sentence in sentences(text):
        for name, branch in ONE_SEED_ONLY.items():
            if re.search(name, sentence, re.I) and not re.search(branch, sentence, re.I):
                found.append(f"names {name} without its branch ({branch}): {sentence!r}")
        found += [f"retired ({why}): {sentence!r}" for pattern, why in RETIRED.items() if re.search(pattern, sentence)]
    found += [f"names {name}, which the analysis no longer calls" for name, call in METHODS.items()
              if re.search(name, text, re.I) and not used(call)]  # fmt: skip
    return found


@pytest.fixture(scope="module")
def demo_config() -> dict:
    return load_config(ROOT / "config" / "demo.yaml")


@pytest.fixture(scope="module")
def rendered(demo_config: dict) -> dict[str, str]:
    return {path.name: render(path.read_text(), demo_config) for path in sorted(REPORT.glob("*.rst"))}


def test_every_caption_renders_as_restructured_text(rendered: dict[str, str]) -> None:
    """Every figure and table has a caption, and each renders (a docutils warning is an error)."""
    tables = {name.replace(".tsv", ".rst") for name in STATS_FILES}
    assert {f"{stem}.rst" for stem in FIGURES} | tables | {"workflow.rst"} <= set(rendered)
    for name, text in rendered.items():
        assert "{{" not in text and "{%" not in text, name
        # halt_level 2: a docutils warning (bad markup) is an error, as it would garble the HTML report.
        body = publish_parts(text, writer="html", settings_overrides={"halt_level": 2, "report_level": 5})
        assert body["body"].strip() or body["title"], name


def test_no_caption_names_a_method_the_analysis_no_longer_uses(rendered: dict[str, str]) -> None:
    found = {name: problems(text) for name, text in rendered.items()}
    assert {name: p for name, p in found.items() if p} == {}
    band = "95% confidence band (unadjusted; the seed-aware t-interval over training seeds and problems"
    assert band in " ".join(rendered["accuracy_vs_shots.rst"].split())  # the config's ci_level, rendered


def test_the_checker_flags_the_old_front_page() -> None:
    """The check can fail: the front page as it read before (eff6f31) is flagged on every count."""
    old = (
        "k examples are drawn from the task's support set. Intervals are 95% percentile-bootstrap confidence "
        "intervals. FOMAML−SFT is compared with the exact McNemar test (accuracy) and the Wilcoxon signed-rank "
        "test (NLL) on per-problem pairs; p-values are Holm-adjusted over all tests of a metric."
    )
    found = "\n".join(problems(old))
    for expected in ("McNemar", "Wilcoxon", "percentile", "dev_pool", "own"):
        assert expected in found


def test_the_front_page_describes_todays_methods(rendered: dict[str, str], demo_config: dict) -> None:
    front = " ".join(rendered["workflow.rst"].split())
    stats = demo_config["stats"]
    for phrase in (
        "dev_pool",  # the data roles
        "seed-aware t-interval",  # the estimator
        "Clopper–Pearson",
        "Newcombe",
        "Holm",  # the families
        "simultaneous",
        "planted-effect check",  # the controls
        "negative control",
        "positive control is rule adoption",
        "exploratory",  # the exploratory rule, with its setting's value
        f"fewer than {stats['primary'].get('min_seeds_confirmatory', 5)} training seeds per arm",
        f"{demo_config['tasks']['split']['dev_pool']} problems",
    ):
        assert phrase in front, phrase
