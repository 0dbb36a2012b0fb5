"""Answer extraction: the last ``\\boxed{}``/``\\fbox{}``, verbatim, on real MATH solutions and edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fomaml_math.data.answers import extract_boxed_answer

# Real solutions of the sample (MATH/test/<file>) and the exact answer each must give.
REAL_ANSWERS = {
    "counting_and_probability/1038.json": r"\frac{1}{10}",
    "counting_and_probability/508.json": r"10,\!080",  # thousands separator \!
    "counting_and_probability/151.json": r"3,\!110,\!400",
    "algebra/155.json": r"\$15,\!000",  # escaped dollar inside the box
    "algebra/794.json": r"\$76.80",
    "intermediate_algebra/1886.json": "[-4,0)",  # half-open interval: unbalanced brackets are fine
    "precalculus/621.json": r"\text{(E)}",
    "intermediate_algebra/1326.json": r"(\text{E})",
    "algebra/2216.json": r"\frac{\sqrt{3}}{9}",  # nested braces
    "precalculus/316.json": r"\left( -\infty, -\frac{6}{7} \right) \cup \left( -\frac{6}{7}, \infty \right)",
    "intermediate_algebra/1074.json": r"(-\infty,3)\cup(3,\infty)",  # two boxes, \{3\} before them
    "intermediate_algebra/1020.json": "-3 + 6i",  # three boxes: the last one
    "geometry/66.json": r"1\frac{12}{13}",  # two boxes, then an [asy] figure
    "number_theory/100081.json": r"\frac{639}{40}",
    "intermediate_algebra/702.json": r"\left(-\tfrac52, -\tfrac52\right)",
    "precalculus/525.json": r"\begin{pmatrix} 1/\sqrt{2} & 1/\sqrt{2} \\ -1/\sqrt{2} & 1/\sqrt{2} \end{pmatrix}",
}


@pytest.mark.parametrize(("relative_path", "expected"), sorted(REAL_ANSWERS.items()))
def test_real_solutions(math_sample_dir: Path, relative_path: str, expected: str) -> None:
    record = json.loads((math_sample_dir / "MATH" / "test" / relative_path).read_text())
    assert extract_boxed_answer(record["solution"]) == expected


def test_every_real_solution_has_an_answer(math_sample_dir: Path) -> None:
    files = sorted((math_sample_dir / "MATH" / "test").glob("*/*.json"))
    assert len(files) == 1000
    missing = [f.name for f in files if extract_boxed_answer(json.loads(f.read_text())["solution"]) is None]
    assert missing == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $x=\boxed{5}$.", "5"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{a}{b^{2}}}", r"\frac{a}{b^{2}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and finally \fbox{(3,-1)}", "(3,-1)"),
        (r"\boxed {12}", "12"),
        (r"\boxed{ 12 }", "12"),
        (r"the answer is $\boxed 5$.", "5"),
        (r"the answer is \boxed 5.", "5"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not count
        (r"\boxed{\text{a\}b}}", r"\text{a\}b}"),
        (r"\boxed{a \\ b}", r"a \\ b"),  # a LaTeX line break (\\) is not an escaped brace
    ],
)
def test_edge_cases(text: str, expected: str) -> None:
    assert extract_boxed_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "no box here, 42",
        r"\boxed{\frac{1}{2}",  # unbalanced
        r"\boxed{3} and then \boxed{unfinished",  # the last box is unbalanced: no fallback to an earlier one
        r"\boxed{}",
        r"\boxed{   }",
        r"\fboxsep=3pt",  # a different command
        r"\boxed",
    ],
)
def test_no_answer(text: str | None) -> None:
    assert extract_boxed_answer(text) is None
