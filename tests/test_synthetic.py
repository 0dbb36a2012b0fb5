"""The synthetic task families: deterministic, exactly checkable, short, levelled and distinct."""

from __future__ import annotations

import re
from collections import Counter
from statistics import mean

import pytest

from fomaml_math.config import MATH_TASKS, ConfigError
from fomaml_math.data.answers import extract_boxed_answer
from fomaml_math.data.synthetic import generate_synthetic, solve_synthetic

PER_TASK = 100


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generate_synthetic(MATH_TASKS, PER_TASK, seed=7)


def test_deterministic_by_seed(records: list[dict]) -> None:
    assert generate_synthetic(MATH_TASKS, PER_TASK, seed=7) == records
    other = generate_synthetic(MATH_TASKS, PER_TASK, seed=8)
    assert [r["problem"] for r in other] != [r["problem"] for r in records]


def test_a_task_does_not_depend_on_the_others(records: list[dict]) -> None:
    alone = generate_synthetic(["geometry"], PER_TASK, seed=7)
    assert alone == [r for r in records if r["task"] == "geometry"]


def test_record_shape_levels_and_origin_split(records: list[dict]) -> None:
    assert Counter(r["task"] for r in records) == dict.fromkeys(MATH_TASKS, PER_TASK)
    for task in MATH_TASKS:
        task_records = [r for r in records if r["task"] == task]
        assert set(task_records[0]) == {"problem", "solution", "level", "task", "source_split"}
        assert Counter(r["level"] for r in task_records) == dict.fromkeys(range(1, 6), PER_TASK // 5)
        assert Counter(r["source_split"] for r in task_records) == {"train": 70, "test": 30}
        assert len({r["problem"] for r in task_records}) == PER_TASK, f"{task}: repeated problems"


def test_every_answer_recomputes_from_the_problem_text(records: list[dict]) -> None:
    for record in records:
        boxed = extract_boxed_answer(record["solution"])
        assert boxed is not None and re.fullmatch(r"-?\d+", boxed), record
        assert solve_synthetic(record["task"], record["problem"]) == int(boxed), record


@pytest.mark.parametrize(
    ("task", "problem", "answer"),
    [
        ("algebra", "Solve for $x$: $3x+5=20$.", 5),
        ("algebra", "If $7-2x=-1$, what is $x$?", 4),
        ("counting_and_probability", "How many ways are there to choose 3 of 7 books?", 35),
        ("counting_and_probability", "In how many ways can 3 of 7 people stand in a line?", 210),
        ("geometry", "A rectangle is 4 by 7. What is its perimeter?", 22),
        ("geometry", "A right triangle has legs 6 and 8. What is its area?", 24),
        ("intermediate_algebra", "Find the sum of the roots of $x^2-5x+6=0$.", 5),
        ("intermediate_algebra", "Find the product of the roots of $x^2+x-12=0$.", -12),
        ("intermediate_algebra", "If $f(x)=2x^2-x+5$, what is $f(-3)$?", 26),
        ("number_theory", "What is the remainder when 247 is divided by 9?", 4),
        ("number_theory", r"Find $\gcd(84,120)$.", 12),
        ("prealgebra", r"Compute $(7+3)\cdot 5$.", 50),
        ("prealgebra", r"Compute $7-3\cdot 5$.", -8),
        ("precalculus", "Find the dot product of $(2,3)$ and $(4,-1)$.", 5),
        ("precalculus", r"Find $\det\begin{pmatrix}2&3\\4&1\end{pmatrix}$.", -10),
    ],
)
def test_solver_on_handwritten_problems(task: str, problem: str, answer: int) -> None:
    """The checker itself is right (so the generator is not only checked against its own logic)."""
    assert solve_synthetic(task, problem) == answer


def test_short_enough_for_a_tiny_model(records: list[dict]) -> None:
    longest = max(records, key=lambda r: len(r["problem"]) + len(r["solution"]))
    assert len(longest["problem"]) + len(longest["solution"]) <= 150, longest


def test_level_scales_the_numbers(records: list[dict]) -> None:
    def largest_number(problem: str) -> int:
        return max(abs(int(n)) for n in re.findall(r"-?\d+", problem.replace("x^2", "x")))

    for task in MATH_TASKS:
        by_level = {
            level: mean(largest_number(r["problem"]) for r in records if r["task"] == task and r["level"] == level)
            for level in (1, 5)
        }
        assert by_level[5] > 1.5 * by_level[1], (task, by_level)


def test_families_have_distinct_templates(records: list[dict]) -> None:
    """No surface template (the problem with its numbers and nouns blanked) is shared by two families."""

    def template(problem: str) -> str:
        return re.sub(r"(# of #) \w+", r"\1 <noun>", re.sub(r"-?\d+", "#", problem))

    templates = {task: {template(r["problem"]) for r in records if r["task"] == task} for task in MATH_TASKS}
    for first in MATH_TASKS:
        for second in MATH_TASKS:
            if first < second:
                assert not templates[first] & templates[second], (first, second)
    # each family also has more than one template, so a family is not a single string pattern
    assert all(len(found) >= 2 for found in templates.values()), templates


def test_bad_requests_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"^tasks\.names"):
        generate_synthetic(["calculus"], 10, seed=0)
    with pytest.raises(ConfigError, match=r"data\.synthetic\.problems_per_task"):
        generate_synthetic(["counting_and_probability"], 10_000, seed=0)
