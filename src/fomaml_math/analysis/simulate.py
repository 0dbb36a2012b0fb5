"""Whole simulated studies of the primary contrast: a generator of binary outcomes at a design, fitted to a study.

One study is ``Y[arm, seed, k, draw, problem]`` (arms ``a``, ``b``), drawn on the logit scale as

    logit P(correct) = β[k, i] + δ·[arm = a] ± ap_i / 2 + u[arm, seed] + v[arm, seed, k, draw]

* ``β[k, i]``: the problem's difficulty at shot count k, fixed (the study's own problems);
* ``ap_i ~ N(0, σ²_ap)``: the method × problem interaction, drawn afresh per study (problems are a sample of the
  problems one could have asked, Miller 2024), + ap/2 for arm a and − ap/2 for arm b;
* ``u ~ N(0, σ²_seed)``: the training seed of one run, independent between arms;
* ``v``: the shot draw of one (run, k, draw), SD ``σ_draw``; SFT and FOMAML of one seed share their draws
  (``eval.shot_draws: per_seed``), so the two arms' ``v`` correlate by ``draw_corr``;
* ``δ``: the planted effect (0 under the null), solved so that the expected accuracy of arm a rises by the target;
* then one Bernoulli draw per cell: the seed × problem residual of the analysis.

:func:`fit_generator` fits these from a study's outcomes by moments on the accuracy scale, turned into logits by
the mean slope of the logistic curve (docs/statistics.md, "The planted-effect check"). The same generator, with
components chosen by hand, is the null simulation of ``tests/test_null_simulation.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy.special import expit, logit

# Simulated studies are drawn in chunks of about this many Bernoulli cells (bounds memory at the paper's design).
CHUNK_CELLS = 1 << 22


@dataclass(frozen=True)
class Generator:
    """The logit-scale model above. ``difficulty`` is ``β[k, i]`` (K × N)."""

    difficulty: np.ndarray
    seed_sd: float
    draw_sd: float
    draw_corr: float
    problem_sd: float  # σ_ap, of the method × problem interaction

    def shift_for(self, target: float) -> float:
        """The logit shift δ that raises the expected accuracy (over k and problems) by ``target``."""
        if target == 0:
            return 0.0
        base = float(expit(self.difficulty).mean())
        if not 0 < base + target < 1:
            raise ValueError(f"planted effect {target:+.3f} leaves the accuracy range from {base:.3f}")
        return float(optimize.brentq(lambda d: float(expit(self.difficulty + d).mean()) - base - target, -30.0, 30.0))

    def studies(
        self, count: int, seeds: int, draws: int, rng: np.random.Generator, *, target: float = 0.0
    ) -> Iterator[np.ndarray]:
        """``count`` studies ``Y[study, arm, seed, k, draw, problem]`` in chunks (arm 0 gets the effect)."""
        shots, n = self.difficulty.shape
        shift = self.shift_for(target)
        per_study = 2 * seeds * shots * draws * n
        step = max(1, CHUNK_CELLS // per_study)
        sign = np.array([0.5, -0.5]).reshape(1, 2, 1, 1, 1, 1)
        planted = np.array([shift, 0.0]).reshape(1, 2, 1, 1, 1, 1)
        for start in range(0, count, step):
            c = min(step, count - start)
            ap = rng.normal(0.0, self.problem_sd, (c, 1, 1, 1, 1, n)) * sign
            u = rng.normal(0.0, self.seed_sd, (c, 2, seeds, 1, 1, 1))
            shared = rng.normal(0.0, 1.0, (c, 1, seeds, shots, draws, 1))
            own = rng.normal(0.0, 1.0, (c, 2, seeds, shots, draws, 1))
            v = self.draw_sd * (math.sqrt(self.draw_corr) * shared + math.sqrt(1.0 - self.draw_corr) * own)
            eta = self.difficulty.reshape(1, 1, 1, shots, 1, n) + planted + ap + u + v
            yield (rng.random((c, 2, seeds, shots, draws, n)) < expit(eta)).astype(np.float64)


def fit_generator(y: np.ndarray) -> Generator:
    """Moment fit of :class:`Generator` to one study's binary ``Y[arm, seed, k, draw, problem]`` (pooled over arms:
    the generator's null has no method difference).

    * ``β[k, i]``: the logit of problem i's success share at k over both arms, seeds and draws, with half a success
      added (Jeffreys), so that no problem is certain;
    * draw: the within-(arm, seed, k) variance of the per-draw accuracies less its binomial part
      ``Σ_i p(1 − p) / N²`` (0 with one draw); ``draw_corr``: the arms' covariance of those per-draw deviations
      over their pooled variance, in [0, 1];
    * seed: the within-arm variance of the per-run accuracies less the draw and binomial parts they hold;
    * problem: the variance over problems of the per-problem arm difference less its binomial part;

    each turned into logits by the mean slope ``p(1 − p)`` of the logistic (the seed and draw shifts act on every
    problem at once; the problem interaction on one: mean of the squared slope).
    """
    _, seeds, shots, draws, n = y.shape
    cells = 2 * seeds * draws
    p = (y.sum(axis=(0, 1, 3)) + 0.5) / (cells + 1.0)  # [k, problem]
    slope = p * (1.0 - p)
    binomial_draw = float(slope.sum(axis=1).mean()) / n**2  # var of one draw's accuracy from the Bernoullis alone
    draw_means = y.mean(axis=-1)  # [arm, seed, k, draw]
    if draws >= 2:
        dev = draw_means - draw_means.mean(axis=-1, keepdims=True)
        within = float(np.mean(dev**2)) * draws / (draws - 1)
        draw_var = max(0.0, within - binomial_draw)
        cov = float(np.mean(dev[0] * dev[1])) * draws / (draws - 1)
        draw_corr = float(np.clip(cov / within, 0.0, 1.0)) if within > 0 else 0.0
    else:
        draw_var, draw_corr = 0.0, 0.0
    run_means = draw_means.mean(axis=(2, 3))  # [arm, seed]
    seed_var = 0.0
    if seeds >= 2:
        between = float(np.mean(np.var(run_means, axis=1, ddof=1)))
        seed_var = max(0.0, between - (draw_var + binomial_draw) / (shots * draws))
    per_problem = y.mean(axis=(1, 3))  # [arm, k, problem]
    diff = (per_problem[0] - per_problem[1]).mean(axis=0)  # over k
    noise = float((2.0 * slope / (seeds * draws)).mean(axis=0).mean()) / shots
    problem_var = max(0.0, float(np.var(diff, ddof=1)) - noise) if n >= 2 else 0.0
    g = float(slope.mean())
    return Generator(
        difficulty=logit(p),
        seed_sd=math.sqrt(seed_var) / g,
        draw_sd=math.sqrt(draw_var) / g,
        draw_corr=draw_corr,
        problem_sd=math.sqrt(problem_var / float(np.mean(slope**2))),
    )


def rejection_rate(
    generator: Generator,
    *,
    seeds: int,
    draws: int,
    replicates: int,
    alpha: float,
    rng: np.random.Generator,
    test: Callable[[np.ndarray], float],
    target: float = 0.0,
) -> float:
    """Share of ``replicates`` simulated studies whose p-value ``test(Y[arm, seed, k, draw, problem])`` is < alpha
    (a NaN p, no test, is no rejection)."""
    rejected = 0
    for chunk in generator.studies(replicates, seeds, draws, rng, target=target):
        for study in chunk:
            p = test(study)
            rejected += bool(math.isfinite(p) and p < alpha)
    return rejected / replicates
