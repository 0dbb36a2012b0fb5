"""An offline generator of seven MATH-like task families with exactly known integer answers, and hidden task rules.

Each family is named after a MATH subject and has its own operations and sentence templates, so
that adapting on one family helps it more than the others. Problems and worked solutions are one
or two short sentences ending in ``Answer: $\\boxed{answer}$``, so that a tiny transformer with a
128-token context can learn them on a CPU in minutes. ``level`` (1-5) scales the numbers.

**Tasks and their hidden rules** (docs/demo.md). A task is a family plus a hidden *answer
convention*: the task's reported answer is the plain result with its units digit replaced by the
task's digit ``d`` (``35`` -> ``37`` when ``d = 7``; the sign is kept). The worked solution computes
the plain result and then reports the converted answer, so the shots of a task show ``d`` and
nothing in a problem does: a model cannot know a task's rule without seeing examples of it. Every
task shares the rule family (the same structure, a different parameter), and where the plain
result already ends in ``d`` the rule leaves it unchanged (about one problem in ten), so a model
that knows only the plain form scores above 0. A task is named ``<family>`` (variant 0) or
``<family>_v<N>`` (variant ``N`` in 1..9); the digits of a family's ten variants are a seeded
permutation of 0..9, so two variants of one family never share a rule. The rule's parameters are
stored with every problem (``rule``, JSON, never rendered to a model).

:func:`solve_synthetic` recomputes an answer from the problem text and the rule, by a different
route than the generator, so every answer can be checked independently. :func:`generate_plain`
writes the rule-free worked problems the tiny base model is pretrained on.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fomaml_math.data.text import normalise_problem_text
from fomaml_math.errors import ConfigError
from fomaml_math.subjects import MATH_TASKS, NUM_VARIANTS, task_family

LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)
TEST_FRACTION = 0.30  # share of each family marked source_split="test", like MATH's 7,500/5,000 mix
_MAX_ATTEMPTS_PER_PROBLEM = 2000

# (low, high) inclusive per level 1..5
Ranges = tuple[tuple[int, int], ...]


def _draw(rng: random.Random, level: int, ranges: Ranges, *, min_magnitude: int = 0) -> int:
    """A uniform integer from the level's range, redrawn until ``abs(value) >= min_magnitude``."""
    low, high = ranges[level - 1]
    while True:
        value = rng.randint(low, high)
        if abs(value) >= min_magnitude:
            return value


def _signed_sum(terms: Sequence[int | str]) -> str:
    """``[8, -3, 2]`` -> ``8-3+2`` (terms may be pre-rendered strings that carry their own sign)."""
    text = str(terms[0])
    for term in terms[1:]:
        rendered = str(term)
        text += rendered if rendered.startswith("-") else f"+{rendered}"
    return text


def _paren(value: int) -> str:
    return f"({value})" if value < 0 else str(value)


def _polynomial(a: int, b: int, c: int) -> str:
    """``a x^2 + b x + c`` in the usual compact form (``x^2-5x+6``, ``2x^2-x``, ``x^2-9``)."""

    def monomial(coefficient: int, power: str) -> str:
        if coefficient == 1:
            return power
        if coefficient == -1:
            return f"-{power}"
        return f"{coefficient}{power}"

    terms: list[str] = [monomial(a, "x^2")]
    if b:
        terms.append(monomial(b, "x"))
    if c:
        terms.append(str(c))
    return _signed_sum(terms)


# --- the families: each returns (problem, solution, answer) ------------------------------------


def _algebra(rng: random.Random, level: int) -> tuple[str, str, int]:
    """Solve a two-step linear equation ``a x + b = c`` (subtract, then divide)."""
    a = _draw(rng, level, ((2, 3), (2, 5), (2, 9), (-9, 12), (-12, 15)), min_magnitude=2)
    x = _draw(rng, level, ((1, 9), (1, 12), (-9, 15), (-20, 20), (-30, 30)))
    b = _draw(rng, level, ((1, 9), (1, 20), (-20, 20), (-50, 50), (-99, 99)), min_magnitude=1)
    c = a * x + b
    left = f"{a}x{b:+d}" if rng.random() < 0.5 else f"{b}{a:+d}x"
    problem = f"Solve for $x$: ${left}={c}$." if rng.random() < 0.5 else f"If ${left}={c}$, what is $x$?"
    undo = f"Subtract {b}" if b > 0 else f"Add {-b}"
    solution = f"{undo}: ${a}x={c - b}$. Divide by {a}: $x=\\boxed{{{x}}}$."
    return problem, solution, x


_CHOOSABLE = (
    "books", "cards", "toys", "pens", "shirts", "flowers", "coins", "stamps", "hats", "songs",
    "games", "apples", "shells", "rings", "cups", "maps", "dice", "bells", "kites", "lamps",
)  # fmt: skip
_ARRANGEABLE = ("people", "students", "kids", "runners", "guests", "players", "dogs", "cars", "boys", "girls")


def _counting_and_probability(rng: random.Random, level: int) -> tuple[str, str, int]:
    """Combinations and arrangements of k out of n."""
    n = _draw(rng, level, ((3, 12), (4, 12), (5, 13), (6, 14), (8, 15)))
    if rng.random() < 0.5:
        k = rng.randint(2, min(n - 1, level + 2, 5))  # k <= 5 keeps the worked solution short
        falling = [n - i for i in range(k)]
        answer = math.prod(falling) // math.prod(range(1, k + 1))
        noun = rng.choice(_CHOOSABLE)
        problem = f"How many ways are there to choose {k} of {n} {noun}?"
        numerator = "\\cdot ".join(map(str, falling))
        solution = f"$\\binom{{{n}}}{{{k}}}=\\frac{{{numerator}}}{{{k}!}}=\\boxed{{{answer}}}$."
    else:
        k = rng.randint(2, min(n, 2 + level // 2))
        falling = [n - i for i in range(k)]
        answer = math.prod(falling)
        noun = rng.choice(_ARRANGEABLE)
        problem = f"In how many ways can {k} of {n} {noun} stand in a line?"
        product = "\\cdot ".join(map(str, falling))
        solution = f"${product}=\\boxed{{{answer}}}$."
    return problem, solution, answer


def _rectangle(rng: random.Random, length: int, width: int) -> str:
    return rng.choice((f"A rectangle is {length} by {width}.", f"A rectangle has sides {length} and {width}."))


def _geometry(rng: random.Random, level: int) -> tuple[str, str, int]:
    """Area and perimeter of rectangles and right triangles."""
    side_ranges: Ranges = ((1, 10), (2, 15), (3, 20), (5, 30), (10, 50))
    first, second = _draw(rng, level, side_ranges), _draw(rng, level, side_ranges)
    shape = rng.choice(("area", "perimeter", "triangle"))
    if shape == "triangle":
        if first * second % 2:
            second += 1  # an even product keeps the area an integer
        answer = first * second // 2
        problem = f"A right triangle has legs {first} and {second}. What is its area?"
        solution = f"Area $=\\frac{{{first}\\cdot {second}}}{{2}}=\\boxed{{{answer}}}$."
    elif shape == "area":
        answer = first * second
        problem = f"{_rectangle(rng, first, second)} What is its area?"
        solution = f"Area $={first}\\cdot {second}=\\boxed{{{answer}}}$."
    else:
        answer = 2 * (first + second)
        problem = f"{_rectangle(rng, first, second)} What is its perimeter?"
        solution = f"Perimeter $=2({first}+{second})=\\boxed{{{answer}}}$."
    return problem, solution, answer


def _intermediate_algebra(rng: random.Random, level: int) -> tuple[str, str, int]:
    """Vieta's formulas on monic quadratics with integer roots, and evaluating a quadratic."""
    kind = rng.choice(("sum", "product", "evaluate"))
    if kind == "evaluate":
        a = _draw(rng, level, ((1, 1), (1, 2), (1, 3), (-3, 4), (-5, 5)), min_magnitude=1)
        b = _draw(rng, level, ((1, 6), (-6, 6), (-9, 9), (-12, 12), (-15, 15)))
        c = _draw(rng, level, ((1, 9), (-9, 9), (-15, 15), (-20, 20), (-30, 30)))
        t = _draw(rng, level, ((1, 4), (1, 5), (-4, 5), (-5, 6), (-7, 7)))
        answer = a * t * t + b * t + c
        terms = [a * t * t] + [v for v in (b * t, c) if v]
        definition = f"f(x)={_polynomial(a, b, c)}"
        problem = (
            f"Let ${definition}$. Find $f({t})$." if rng.random() < 0.5 else f"If ${definition}$, what is $f({t})$?"
        )
        solution = f"$f({t})={_signed_sum(terms)}=\\boxed{{{answer}}}$."
        return problem, solution, answer
    root_ranges: Ranges = ((1, 6), (-6, 9), (-9, 12), (-15, 15), (-20, 20))
    r, s = _draw(rng, level, root_ranges), _draw(rng, level, root_ranges)
    b, c = -(r + s), r * s
    if kind == "sum":
        answer = r + s
        problem = f"Find the sum of the roots of ${_polynomial(1, b, c)}=0$."
        solution = f"By Vieta, the sum of the roots is $-({b})=\\boxed{{{answer}}}$."
    else:
        answer = r * s
        problem = f"Find the product of the roots of ${_polynomial(1, b, c)}=0$."
        solution = f"By Vieta, the product of the roots is $\\boxed{{{answer}}}$."
    return problem, solution, answer


def _number_theory(rng: random.Random, level: int) -> tuple[str, str, int]:
    """Remainders by division, and gcds by Euclid's algorithm."""
    if rng.random() < 0.5:
        modulus = _draw(rng, level, ((2, 5), (3, 9), (4, 12), (6, 19), (11, 30)))
        dividend = _draw(rng, level, ((10, 99), (20, 150), (50, 300), (100, 999), (500, 3000)))
        quotient, answer = divmod(dividend, modulus)
        problem = f"What is the remainder when {dividend} is divided by {modulus}?"
        solution = f"${dividend}={quotient}\\cdot {modulus}+{answer}$, so the remainder is $\\boxed{{{answer}}}$."
        return problem, solution, answer
    factor = _draw(rng, level, ((2, 5), (2, 9), (3, 12), (4, 16), (6, 24)))
    while True:
        p, q = rng.sample(range(2, 6 + level), 2)
        if math.gcd(p, q) == 1:
            break
    first, second = factor * p, factor * q
    chain: list[str] = []
    x, y = max(first, second), min(first, second)
    while y:
        chain.append(f"\\gcd({x},{y})")
        x, y = y, x % y
    problem = f"Find $\\gcd({first},{second})$."
    steps = "=".join(chain)
    solution = f"${steps}=\\boxed{{{x}}}$."
    return problem, solution, x


def _prealgebra(rng: random.Random, level: int) -> tuple[str, str, int]:
    """Order of operations: ``a + b c``, ``a - b c`` and ``(a + b) c``."""
    number_ranges: Ranges = ((1, 9), (2, 12), (2, 20), (5, 40), (10, 99))
    a, b, c = (_draw(rng, level, number_ranges) for _ in range(3))
    kind = rng.choice(("plus", "minus", "paren") if level >= 3 else ("plus", "paren"))
    if kind == "paren":
        inner = a + b
        answer = inner * c
        problem = f"Compute $({a}+{b})\\cdot {c}$."
        solution = f"First ${a}+{b}={inner}$, then ${inner}\\cdot {c}=\\boxed{{{answer}}}$."
    else:
        product = b * c
        answer = a + product if kind == "plus" else a - product
        sign = "+" if kind == "plus" else "-"
        problem = f"Compute ${a}{sign}{b}\\cdot {c}$."
        solution = f"First ${b}\\cdot {c}={product}$, then ${a}{sign}{product}=\\boxed{{{answer}}}$."
    return problem, solution, answer


def _precalculus(rng: random.Random, level: int) -> tuple[str, str, int]:
    """Dot products of plane vectors and 2x2 determinants."""
    entry_ranges: Ranges = ((0, 5), (-3, 6), (-6, 9), (-9, 12), (-15, 15))
    p, q, r, s = (_draw(rng, level, entry_ranges) for _ in range(4))
    if rng.random() < 0.5:
        answer = p * r + q * s
        problem = f"Find the dot product of $({p},{q})$ and $({r},{s})$."
        solution = f"${p}\\cdot {_paren(r)}+{q}\\cdot {_paren(s)}={_signed_sum([p * r, q * s])}=\\boxed{{{answer}}}$."
    else:
        answer = p * s - q * r
        problem = f"Find $\\det\\begin{{pmatrix}}{p}&{q}\\\\{r}&{s}\\end{{pmatrix}}$."
        solution = (
            f"${p}\\cdot {_paren(s)}-{q}\\cdot {_paren(r)}={_signed_sum([p * s, -(q * r)])}=\\boxed{{{answer}}}$."
        )
    return problem, solution, answer


FAMILIES: dict[str, Callable[[random.Random, int], tuple[str, str, int]]] = {
    "algebra": _algebra,
    "counting_and_probability": _counting_and_probability,
    "geometry": _geometry,
    "intermediate_algebra": _intermediate_algebra,
    "number_theory": _number_theory,
    "prealgebra": _prealgebra,
    "precalculus": _precalculus,
}
assert tuple(FAMILIES) == MATH_TASKS


# --- tasks and their hidden rules --------------------------------------------------------------

RULE_KIND = "units_digit"


@dataclass(frozen=True)
class TaskRule:
    """A task's hidden answer convention: the plain result's units digit is replaced by ``digit``."""

    digit: int
    kind: str = RULE_KIND

    def apply(self, plain: int) -> int:
        sign = -1 if plain < 0 else 1
        return sign * (abs(plain) // 10 * 10 + self.digit)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "digit": self.digit}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> TaskRule:
        fields = json.loads(text) if isinstance(text, str) else dict(text)
        if fields.get("kind") != RULE_KIND or not isinstance(fields.get("digit"), int) or not 0 <= fields["digit"] <= 9:
            raise ValueError(f"not a synthetic task rule: {text!r}")
        return cls(int(fields["digit"]))


def task_rule(task: str, seed: int) -> TaskRule:
    """The rule of ``task``: variant N of a family gets the N-th digit of the family's seeded permutation of 0..9.

    It depends only on the seed, the family and the variant, so adding or removing a task changes no other
    task's rule, and no two variants of a family share a digit.
    """
    family, variant = task_family(task)
    digits = list(range(NUM_VARIANTS))
    random.Random(f"synthetic-rule:{seed}:{family}").shuffle(digits)
    return TaskRule(digits[variant])


def _worked(solution: str, plain: int, reported: int) -> str:
    """The family's solution with its result unboxed, then the reported answer boxed on its own."""
    boxed = f"\\boxed{{{plain}}}"
    if boxed not in solution:
        raise AssertionError(f"family solution without its boxed result: {solution!r}")
    return f"{solution.replace(boxed, str(plain))} Answer: $\\boxed{{{reported}}}$."


def _draw_distinct(
    family: str, rng: random.Random, level: int, seen: set[str], exclude: Collection[str], what: str
) -> tuple[str, str, int]:
    for _ in range(_MAX_ATTEMPTS_PER_PROBLEM):
        problem, solution, answer = FAMILIES[family](rng, level)
        if problem not in seen and normalise_problem_text(problem) not in exclude:
            return problem, solution, answer
    raise ConfigError(f"{what} more distinct level-{level} problems than the {family} family can generate; use fewer")


def generate_synthetic(tasks: Sequence[str], problems_per_task: int, seed: int) -> list[dict[str, Any]]:
    """``problems_per_task`` distinct problems per task, levels 1-5 in equal shares, deterministic by seed.

    Each task draws from its own random stream (seeded by ``seed`` and the task name), so adding or
    removing a task leaves the others' problems unchanged. Records have the keys ``problem``,
    ``solution`` (its boxed answer is the task's rule applied to the plain result), ``level``, ``task``,
    ``source_split`` (about 70% train, 30% test) and ``rule`` (JSON of :class:`TaskRule`; never rendered).
    """
    families = {task: task_family(task)[0] for task in tasks}
    if problems_per_task < 1:
        raise ConfigError(f"data.synthetic.problems_per_task: expected a positive integer, got {problems_per_task}")
    records: list[dict[str, Any]] = []
    for task in tasks:
        rng = random.Random(f"synthetic:{seed}:{task}")
        rule = task_rule(task, seed)
        seen: set[str] = set()
        task_records: list[dict[str, Any]] = []
        for index in range(problems_per_task):
            level = LEVELS[index % len(LEVELS)]
            what = f"data.synthetic.problems_per_task: {problems_per_task} for {task} is"
            problem, solution, plain = _draw_distinct(families[task], rng, level, seen, (), what)
            seen.add(problem)
            task_records.append(
                {
                    "problem": problem,
                    "solution": _worked(solution, plain, rule.apply(plain)),
                    "level": level,
                    "task": task,
                    "rule": rule.to_json(),
                }
            )
        test_indices = set(rng.sample(range(problems_per_task), round(TEST_FRACTION * problems_per_task)))
        for index, record in enumerate(task_records):
            record["source_split"] = "test" if index in test_indices else "train"
        records.extend(task_records)
    return records


def generate_plain(
    families: Sequence[str], problems_per_family: int, seed: int, exclude: Collection[str] = ()
) -> list[dict[str, str]]:
    """Rule-free worked problems of ``families`` (the pretraining corpus of the tiny base model).

    The same templates and solution form as the tasks, but the boxed answer is the plain result: no task's
    rule. Drawn from a stream of their own (``seed``), levels 1-5 in equal shares, and never a problem whose
    normalised text is in ``exclude`` (the dev and test problems). Records: ``problem``, ``solution``, ``family``.
    """
    records: list[dict[str, str]] = []
    exclude = frozenset(exclude)
    for family in families:
        if family not in FAMILIES:
            raise ConfigError(f"tasks.names: no synthetic family {family!r}; expected one of {list(FAMILIES)}")
        rng = random.Random(f"synthetic-plain:{seed}:{family}")
        seen: set[str] = set()
        for index in range(problems_per_family):
            level = LEVELS[index % len(LEVELS)]
            what = f"model.pretrain.problems_per_family: {problems_per_family} is"
            problem, solution, plain = _draw_distinct(family, rng, level, seen, exclude, what)
            seen.add(problem)
            records.append({"problem": problem, "solution": _worked(solution, plain, plain), "family": family})
    return records


# --- independent recomputation from the problem text ------------------------------------------

_BINARY_OPERATORS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
}
_INT = r"-?\d+"


def _evaluate_arithmetic(expression: str) -> int:
    """Evaluate ``+ - *`` integer arithmetic with parentheses (no ``eval``)."""

    def visit(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -visit(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
            return _BINARY_OPERATORS[type(node.op)](visit(node.left), visit(node.right))
        raise ValueError(f"unsupported arithmetic in {expression!r}")

    return visit(ast.parse(expression.replace("\\cdot", "*"), mode="eval").body)


def _quadratic_coefficients(polynomial: str) -> tuple[int, int, int]:
    """``2x^2-x+5`` -> ``(2, -1, 5)``."""
    coefficients = {2: 0, 1: 0, 0: 0}
    for sign, number, variable, power in re.findall(r"([+-]?)(\d*)(x?)(\^2)?", polynomial):
        if not (number or variable):
            continue
        value = int(number) if number else 1
        degree = 2 if power else (1 if variable else 0)
        coefficients[degree] += -value if sign == "-" else value
    return coefficients[2], coefficients[1], coefficients[0]


def _exact_quotient(numerator: int, denominator: int) -> int:
    quotient, remainder = divmod(numerator, denominator)
    if remainder:
        raise ValueError(f"{numerator}/{denominator} is not an integer")
    return quotient


def solve_synthetic(task: str, problem: str, rule: str | Mapping[str, Any] | TaskRule | None = None) -> int:
    """Recompute the answer of a generated ``problem`` from its text and the task's ``rule`` (the ``rule``
    column; None: the plain result). Used to verify the generator and the stored answers."""
    family = task_family(task)[0]
    plain = _solve_plain(family, problem)
    if rule is None:
        return plain
    return (rule if isinstance(rule, TaskRule) else TaskRule.from_json(rule)).apply(plain)


def _solve_plain(task: str, problem: str) -> int:
    if task == "algebra":
        left, right = re.search(r"\$([^$]*x[^$]*)=(" + _INT + r")\$", problem).groups()
        coefficient = int(re.search(r"(" + _INT + r"|[+-]\d+)x", left).group(1))
        constant = int(re.sub(r"[+-]?\d+x", "", left))
        return _exact_quotient(int(right) - constant, coefficient)
    if task == "counting_and_probability":
        k, n = map(int, re.search(r"(\d+) of (\d+)", problem).groups())
        return math.comb(n, k) if "choose" in problem else math.perm(n, k)
    if task == "geometry":
        first, second = map(int, re.findall(r"\d+", problem))
        if "triangle" in problem:
            return _exact_quotient(first * second, 2)
        return first * second if "area" in problem else 2 * (first + second)
    if task == "intermediate_algebra":
        if "f(x)" in problem:
            a, b, c = _quadratic_coefficients(re.search(r"f\(x\)=([^$]+)\$", problem).group(1))
            t = int(re.findall(r"f\((" + _INT + r")\)", problem)[-1])
            return a * t**2 + b * t + c
        a, b, c = _quadratic_coefficients(re.search(r"\$([^$]+)=0\$", problem).group(1))
        return _exact_quotient(-b, a) if "sum" in problem else _exact_quotient(c, a)
    if task == "number_theory":
        if "remainder" in problem:
            dividend, modulus = map(int, re.findall(r"\d+", problem))
            return dividend % modulus
        return math.gcd(*map(int, re.search(r"gcd\((\d+),(\d+)\)", problem).groups()))
    if task == "prealgebra":
        return _evaluate_arithmetic(re.search(r"\$([^$]+)\$", problem).group(1))
    if task == "precalculus":
        p, q, r, s = map(int, re.findall(_INT, problem))
        return p * r + q * s if "dot product" in problem else p * s - q * r
    raise ValueError(f"unknown synthetic task {task!r}")
