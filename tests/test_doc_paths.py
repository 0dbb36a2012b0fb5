"""Every ``results/...`` path that README.md and docs/ name is one the workflow writes.

The rules' outputs, logs, benchmarks and output folders are read from the parsed workflow (Snakemake's API, under
the paper, demo, test and pilot configs, the tuner on and off); a documented path must be one of them or a folder above
one.  Placeholders in the docs (``<experiment>``, ``<k>``, ``{a,b}``, ``*``) stand for any one path component.
A docs example that writes to a stand-alone folder on purpose (a hand-run stage) says so in the line it is on,
with the words "stand-alone folder", and is exempt.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.workflow_utils import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "config" / "README.md"]
PATH_IN_TEXT = re.compile(r"results/[A-Za-z0-9_.{}<>*,/|-]*[A-Za-z0-9_}>*/]")
EXEMPT = "stand-alone folder"
# Written by other commands than the rules: `make gpu-check` (bench/gpu_check.py), `snakemake --report`, and the
# per-GPU lock files of `python -m fomaml_math.devices run` (docs/evaluation.md).
NOT_WORKFLOW = ("results/gpu-check", "results/report.html", "results/.gpu-locks")


def _wildcard_regex(pattern: str) -> str:
    """A rule's path pattern as a regex: ``{name,constraint}`` keeps its constraint, ``{name}`` is one component."""
    out, pos = [], 0
    for match in re.finditer(r"\{([A-Za-z_]\w*)(?:,((?:[^{}]|\{[^{}]*\})*))?\}", pattern):  # {name} or {name,re}
        out.append(re.escape(pattern[pos : match.start()]))
        constraint = match.group(2)
        out.append("[^/]+" if constraint is None else f"(?:{constraint})")
        pos = match.end()
    out.append(re.escape(pattern[pos:]))
    return "".join(out)


CONSTRAINED = re.compile(r"\{([A-Za-z_]\w*),((?:[^{}]|\{[^{}]*\})*)\}")


def _constrain(pattern: str, constraints: dict[str, str]) -> str:
    """``{name}`` as ``{name,constraint}`` where ``constraints`` has one."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"{{{name},{constraints[name]}}}" if name in constraints else match.group(0)

    return re.sub(r"\{(\w+)\}", one, pattern)


def _rule_paths(configfile: Path, overrides: dict) -> list[str]:
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings()) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[configfile], config=overrides),
            snakefile=REPO_ROOT / "workflow" / "Snakefile",
            workdir=REPO_ROOT,
        )
        paths = []
        for rule in workflow_api._workflow.rules:
            paths += [str(f) for f in rule.output] + [str(f) for f in rule.log]
            # anything inside a directory() output (a model folder's files, candidates/step-N/)
            paths += [f"{f}/{{inside,.+}}" for f in rule.output if "directory" in f.flags]
            if rule.benchmark:
                paths.append(str(rule.benchmark))
            # folders passed as params (the checkpoint dir), constrained as the rule's outputs constrain them
            constraints = dict(CONSTRAINED.findall(" ".join(map(str, rule.output))))
            for _, value in rule.params.items():
                if isinstance(value, str) and value.startswith("results/"):
                    paths.append(_constrain(value, constraints))
        return paths


@pytest.fixture(scope="module")
def rule_paths() -> set[str]:
    """Regexes of every path and every folder above one that some config's rules write (experiment names are
    each config's own: a doc names the paper's, e.g. in_domain, or says <experiment>)."""
    from snakemake_interface_common.exceptions import WorkflowError

    paths: set[str] = set()
    untuned = 0
    for name in ("config.yaml", "demo.yaml", "test.yaml", "pilot.yaml"):
        paths.update(_rule_paths(REPO_ROOT / "config" / name, {}))
        try:  # the untuned base's folder; refused where an experiment has meta_val tasks (only the tuner reads them)
            paths.update(_rule_paths(REPO_ROOT / "config" / name, {"calibration": {"enabled": False}}))
            untuned += 1
        except WorkflowError as error:
            assert "meta_val" in str(error)
    assert untuned >= 1
    return paths


@pytest.fixture(scope="module")
def written_paths(rule_paths: set[str]) -> list[re.Pattern[str]]:
    """Regexes of every path and every folder above one that some config's rules write."""
    paths = rule_paths
    regexes = set()
    for path in paths:
        parts = path.split("/")
        for end in range(2, len(parts) + 1):  # the path and every folder above it (results/x, results/x/y, ...)
            regexes.add(_wildcard_regex("/".join(parts[:end])))
    return [re.compile(r) for r in regexes]


def _samples(doc_path: str) -> list[str]:
    """Concrete spellings of a documented path: placeholders become one component, braces each alternative."""
    path = doc_path.rstrip("/")
    braces = re.search(r"\{([^{}]*)\}", path)
    if braces:
        return [s for alt in braces.group(1).split(",") for s in _samples(path.replace(braces.group(0), alt, 1))]
    path = re.sub(r"<s>|<seed>", "0", path)
    path = re.sub(r"<k>|<K>|<N>|step-N\b", lambda m: "step-5" if m.group(0) == "step-N" else "5", path)
    path = path.replace("<method>", "fomaml").replace("<run>", "in_domain/fomaml/seed-0")
    path = re.sub(r"<(experiment|exp|name)>", "in_domain", path)  # the paper config's first experiment
    path = re.sub(r"<[^<>/]+>", "algebra", path)  # <task>, ...
    return [path]


def _documented_paths() -> list[tuple[str, int, str]]:
    found = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            if EXEMPT in line:
                continue
            for match in PATH_IN_TEXT.finditer(line):
                found.append((doc.relative_to(REPO_ROOT).as_posix(), number, match.group(0)))
    return found


def test_the_docs_name_results_paths() -> None:
    assert len(_documented_paths()) > 30  # the extraction finds the README's layout and the docs' commands


def _glob_matches(sample: str, rule_paths: set[str]) -> bool:
    """A documented glob (``stats/*.tsv``, ``benchmarks/**.tsv``) names at least one path a rule writes."""
    glob = re.escape(sample).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    return any(re.fullmatch(glob, path) for path in rule_paths)


def test_every_documented_results_path_is_written_by_a_rule(
    written_paths: list[re.Pattern[str]], rule_paths: set[str]
) -> None:
    wrong = []
    for doc, line, path in _documented_paths():
        if path.startswith(NOT_WORKFLOW):
            continue
        for sample in _samples(path):
            if "*" in sample:
                found = _glob_matches(sample, rule_paths)
            else:
                found = any(r.fullmatch(sample) for r in written_paths)
            if not found:
                wrong.append(f"{doc}:{line}: {path} ({sample})")
    assert not wrong, "paths no rule writes:\n" + "\n".join(wrong)


def test_a_stale_path_is_caught(written_paths: list[re.Pattern[str]]) -> None:
    """The README's old multi-node recipe named results/models/fomaml/train_summary.json: not a rule's path."""
    assert not any(r.fullmatch("results/models/fomaml/train_summary.json") for r in written_paths)
    assert any(r.fullmatch("results/in_domain/fomaml/seed-0/train_summary.json") for r in written_paths)
