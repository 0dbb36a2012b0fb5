"""The synthetic task families: deterministic, exactly checkable, short, levelled and distinct; the hidden rules."""

from __future__ import annotations

import re
from collections import Counter
from statistics import mean

import pytest

from fomaml_math.data.answers import extract_boxed_answer
from fomaml_math.data.synthetic import TaskRule, generate_plain, generate_synthetic, solve_synthetic, task_rule
from fomaml_math.data.text import normalise_problem_text
from fomaml_math.errors import ConfigError
from fomaml_math.subjects import MATH_TASKS, task_family

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
        assert set(task_records[0]) == {"problem", "solution", "level", "task", "source_split", "rule"}
        assert Counter(r["level"] for r in task_records) == dict.fromkeys(range(1, 6), PER_TASK // 5)
        assert Counter(r["source_split"] for r in task_records) == {"train": 70, "test": 30}
        assert len({r["problem"] for r in task_records}) == PER_TASK, f"{task}: repeated problems"


def test_every_answer_recomputes_from_the_problem_text_and_the_rule(records: list[dict]) -> None:
    for record in records:
        boxed = extract_boxed_answer(record["solution"])
        assert boxed is not None and re.fullmatch(r"-?\d+", boxed), record
        assert solve_synthetic(record["task"], record["problem"], record["rule"]) == int(boxed), record
        # the worked solution shows the plain result, then the reported answer
        plain = solve_synthetic(record["task"], record["problem"])
        assert f"{plain}$. Answer: $\\boxed{{{boxed}}}$." in record["solution"], record


def test_rule_replaces_the_units_digit_by_hand() -> None:
    rule = TaskRule(7)
    assert [rule.apply(v) for v in (35, 3, 0, -35, -4, 120, 7)] == [37, 7, 7, -37, -7, 127, 7]
    assert TaskRule.from_json(rule.to_json()) == rule
    rule_json = '{"kind": "units_digit", "digit": 5}'
    assert solve_synthetic("geometry_v2", "A rectangle is 4 by 7. What is its perimeter?", rule_json) == 25
    with pytest.raises(ValueError, match="not a synthetic task rule"):
        TaskRule.from_json('{"kind": "offset", "digit": 3}')


def test_rules_are_fixed_per_task_shared_in_form_and_distinct_within_a_family(records: list[dict]) -> None:
    for task in MATH_TASKS:
        assert {r["rule"] for r in records if r["task"] == task} == {task_rule(task, 7).to_json()}
        variants = [task] + [f"{task}_v{n}" for n in range(1, 10)]
        assert sorted(task_rule(v, 7).digit for v in variants) == list(range(10)), task
    assert task_family("number_theory_v3") == ("number_theory", 3)
    # a variant's problems come from its own stream; its answers follow its own rule
    variant = generate_synthetic(["prealgebra_v1"], 50, seed=7)
    digit = task_rule("prealgebra_v1", 7).digit
    assert all(abs(int(extract_boxed_answer(r["solution"]))) % 10 == digit for r in variant)


def test_some_answers_are_unchanged_by_the_rule(records: list[dict]) -> None:
    """Where the plain result already ends in the task's digit, a rule-free model scores: base accuracy > 0."""
    unchanged = [
        r
        for r in records
        if solve_synthetic(r["task"], r["problem"]) == solve_synthetic(r["task"], r["problem"], r["rule"])
    ]
    assert 0.03 * len(records) < len(unchanged) < 0.3 * len(records)
    assert {r["task"] for r in unchanged} == set(MATH_TASKS)


def test_plain_corpus_is_rule_free_and_avoids_excluded_problems(records: list[dict]) -> None:
    excluded = {normalise_problem_text(r["problem"]) for r in records if r["task"] == "prealgebra"}
    plain = generate_plain(["prealgebra", "geometry"], 40, seed=7, exclude=excluded)
    assert [r["family"] for r in plain] == ["prealgebra"] * 40 + ["geometry"] * 40
    assert not {normalise_problem_text(r["problem"]) for r in plain} & excluded
    for record in plain:
        assert int(extract_boxed_answer(record["solution"])) == solve_synthetic(record["family"], record["problem"])
    assert generate_plain(["prealgebra"], 10, seed=7) != generate_plain(["prealgebra"], 10, seed=8)


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
    assert len(longest["problem"]) + len(longest["solution"]) <= 175, longest


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
    with pytest.raises(ConfigError, match=r"^tasks\.names: 'algebra_v0'"):
        generate_synthetic(["algebra_v0"], 10, seed=0)
    with pytest.raises(ConfigError, match=r"data\.synthetic\.problems_per_task"):
        generate_synthetic(["counting_and_probability"], 10_000, seed=0)
