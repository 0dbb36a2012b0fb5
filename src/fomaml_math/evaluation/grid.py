"""The tuner's grid of (rate, steps) per tuned k: its ends, how it is extended past one, and what it costs.

Standard library only: ``plan`` prices the tuner from it without loading the model code.

* **Edges.** A choice sits at an *edge* when its rate is the lowest or highest of a grid of several rates, or
  its step count the highest, or the lowest when 0 (not adapting) is not in the grid and the lowest is above 1.
  Not adapting is an option, not an edge (there is nothing below 0 steps, and its rate means nothing), and 1
  step is the floor.
* **Extension.** Past a rate edge the grid gains one rate at the grid's own ratio on that side (the ratio of
  its two outermost rates there); past the highest step count the step counts double (one new count, twice
  the largest); past the lowest they halve.
* **Resolution.** Whether an edge is worth extending past is for the tuner to say (it compares the choice with
  its interior neighbour against ``calibration.edge_margin`` dev problems: docs/evaluation.md, "Tuning").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

AXES: tuple[str, ...] = ("lr", "num_steps")


def _round_rate(value: float) -> float:
    """Three significant digits, so an extended rate prints (and names its flag file) as the grid's rates do."""
    return float(f"{value:.3g}")


@dataclass(frozen=True)
class Grid:
    """One tuned k's rates and step counts, both ascending."""

    lrs: tuple[float, ...]
    steps: tuple[int, ...]

    @classmethod
    def of(cls, lrs: Sequence[float], steps: Sequence[int]) -> Grid:
        return cls(tuple(sorted({float(x) for x in lrs})), tuple(sorted({int(s) for s in steps})))

    @property
    def adapted_steps(self) -> list[int]:
        """The step counts that adapt (all but 0, not adapting)."""
        return [s for s in self.steps if s > 0]

    def axis(self, axis: str) -> tuple[float, ...] | tuple[int, ...]:
        return self.lrs if axis == "lr" else self.steps

    def edges(self, lr: float, num_steps: int) -> list[str]:
        """The edges (``"lr:highest"``, ``"num_steps:lowest"``, ...) a point at (lr, num_steps) sits on."""
        if num_steps == 0:
            return []
        out = []
        if len(self.lrs) > 1 and lr in (self.lrs[0], self.lrs[-1]):
            out.append(f"lr:{'lowest' if lr == self.lrs[0] else 'highest'}")
        positive = self.adapted_steps
        if len(positive) > 1 or (positive and 0 not in self.steps):
            if num_steps == positive[-1] and len(self.steps) > 1:
                out.append("num_steps:highest")
            elif num_steps == positive[0] and 0 not in self.steps and num_steps > 1:
                out.append("num_steps:lowest")
        return out

    def inward(self, edge: str, lr: float, num_steps: int) -> tuple[float, int] | None:
        """The grid point next to (lr, num_steps) away from ``edge`` on its axis (None if the axis has one value)."""
        axis, end = edge.split(":")
        values = self.axis(axis)
        here = values.index(lr if axis == "lr" else num_steps)  # type: ignore[arg-type]
        other = here + 1 if end == "lowest" else here - 1
        if not 0 <= other < len(values):
            return None
        return (float(values[other]), num_steps) if axis == "lr" else (lr, int(values[other]))

    def neighbours(self, lr: float, num_steps: int) -> list[tuple[float, int]]:
        """The adapted grid points next to (lr, num_steps) on either axis (not adapting is not one: always graded)."""
        if num_steps == 0:
            return []
        i, j = self.lrs.index(lr), self.steps.index(num_steps)
        out = [(self.lrs[a], num_steps) for a in (i - 1, i + 1) if 0 <= a < len(self.lrs)]
        return out + [(lr, self.steps[b]) for b in (j - 1, j + 1) if 0 <= b < len(self.steps) and self.steps[b] > 0]

    def beyond(self, edge: str) -> float | int | None:
        """The value one extension past ``edge`` adds (None where nothing lies beyond: 1 step halved)."""
        axis, end = edge.split(":")
        if axis == "lr":
            lo, hi = (self.lrs[0], self.lrs[1]) if end == "lowest" else (self.lrs[-2], self.lrs[-1])
            return _round_rate(lo / (hi / lo)) if end == "lowest" else _round_rate(hi * (hi / lo))
        positive = self.adapted_steps
        if end == "highest":
            return 2 * positive[-1]
        return positive[0] // 2 if positive[0] > 1 else None

    def extended(self, edges: Sequence[str]) -> Grid:
        """The grid with one value added past each of ``edges``."""
        lrs, steps = list(self.lrs), list(self.steps)
        for edge in edges:
            value = self.beyond(edge)
            if value is None:
                continue
            (lrs if edge.startswith("lr:") else steps).append(value)  # type: ignore[arg-type]
        return Grid.of(lrs, steps)

    def to_json(self) -> dict[str, list[Any]]:
        return {"lr_grid": list(self.lrs), "steps_grid": list(self.steps)}


def worst_case_grids(grid: Grid, max_extensions: int) -> list[Grid]:
    """The grids of a tuned k that extends ``max_extensions`` times past its highest rate and step count (the
    dearer directions): round 0 is ``grid`` itself.  ``plan`` prices the tuner at this cap."""
    grids = [grid]
    for _ in range(max_extensions):
        last = grids[-1]
        edges = [e for e in ("lr:highest", "num_steps:highest") if len(last.axis(e.split(":")[0])) > 1]
        grids.append(last.extended(edges))
    return grids


@dataclass(frozen=True)
class TunerWork:
    """What one tuner job (all its candidates) costs for one tuned k > 0, in units ``plan`` prices, per task and
    draw: adaptation steps (each on k shots), dev NLL passes (one forward over the tuning examples) and generation
    passes (greedy answers to the tuning examples).  The unadapted pass is per candidate, not per k: the caller's."""

    adapt_steps: int
    nll_passes: int
    generation_passes: int


def tuner_work(grid: Grid, *, candidates: int, max_extensions: int, screen: int | None) -> TunerWork:
    """The work of one tuned k at the cap (every round extends both axes upwards), as :mod:`calibrate` does it:

    * round 0: every candidate adapts with each rate to the grid's largest step count, measuring the dev NLL at
      every step count of the grid (exhaustive: and generating there);
    * screened: the ``screen`` best points by answer NLL and, for a hill-climb of two moves, the choice's four
      neighbours twice are generated, each distinct rate among them adapted once more (at most one run per rate);
    * each round: the new rate's column and the choice's rate at the doubled step count (two runs to the new
      largest step count, from the chosen checkpoint only), the choice's three continuations generated in them
      (exhaustive: every new point), and (screened) two more runs for the new choice's inward neighbours.
    """
    positive = grid.adapted_steps
    top = max(positive, default=0)
    adapt = candidates * len(grid.lrs) * top
    nll = generated = candidates * len(grid.lrs) * len(positive)  # exhaustive: every measured point generated
    if screen is not None:  # the screen, then a hill-climb priced as two steps of four neighbours each
        generated = screen + 8
        adapt += min(screen + 8, len(grid.lrs)) * top
    for extended in worst_case_grids(grid, max_extensions)[1:]:
        positive = extended.adapted_steps
        top = max(positive)
        adapt += 2 * top
        nll += len(positive) + 1
        generated += len(positive) + 1 if screen is None else 3
        if screen is not None:
            adapt += 2 * top
            generated += 2
    return TunerWork(adapt, nll, generated)


def rounds_summary(extensions: Sequence[Mapping[str, Any]]) -> str:
    """``"num_steps:highest -> 64; lr:highest -> 0.0333"``: the extensions of one choice, for a report line."""
    return "; ".join(f"{e['edge']} -> {e['added']:g}" for e in extensions)


def is_rate_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
