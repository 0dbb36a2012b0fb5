"""Grading generated solutions against MATH gold answers with math-verify, under a hard time limit.

The answer of an output is the content of its last ``\\boxed{}``/``\\fbox{}``
(:func:`fomaml_math.data.answers.extract_boxed_answer`, the same extractor that made the gold
answers). Gold and prediction are both parsed by math-verify as ``\\boxed{<answer>}`` and compared
with ``verify(gold, prediction)``: gold first, because math-verify's comparison is not symmetric.

Time limit. math-verify 0.9's own timeout is ``signal.alarm``: whole seconds only, only in the main
thread of the main interpreter, unable to interrupt C code (a huge integer power, a regex stuck
backtracking), and a timeout is swallowed into ``False``, indistinguishable from a wrong answer.
So checks run in worker processes with math-verify's timeouts switched off, and the parent enforces
the limit itself: a worker that overruns is killed (SIGKILL always works), the check is recorded
as ``timeout`` (wrong, and counted), and a fresh worker takes over. Several workers may grade in
parallel (``workers``); they start only when some output has a box to check.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import re
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from fomaml_math.data.answers import extract_boxed_answer

GRADE_STATUSES: tuple[str, ...] = ("ok", "no_answer", "timeout", "error")

# A worker's address space is capped so a runaway expression fails with MemoryError
# (status "error") instead of taking the machine's memory.
WORKER_MEMORY_LIMIT_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class GradeResult:
    """The outcome of grading one output: ``status`` is one of :data:`GRADE_STATUSES`."""

    extracted: str | None
    correct: bool
    status: str


def extract_answer(generated: str) -> str | None:
    """The content of the last ``\\boxed{}`` in a generated solution, or None."""
    return extract_boxed_answer(generated)


# ``\frac\pi4``: math-verify 0.9 mangles a brace-less fraction whose argument is a command
# (it reads ``\frac \pi4 + 2 - \sqrt2`` as 2), so such arguments get their braces first.
_FRAC_ARG = r"(\{[^{}]*\}|\\[A-Za-z]+|[^\s{}\\])"
_BRACELESS_FRAC = re.compile(r"\\([dt]?frac)(?![A-Za-z])\s*" + _FRAC_ARG + r"\s*" + _FRAC_ARG)
# ``\text{A,C,F}`` (multiple choice, several letters) is one opaque symbol to math-verify; as plain
# ``A,C,F`` it is the set {a, c, f}, so "A, C, F" matches. Only letter lists are unwrapped:
# ``\text{odd}`` must stay a word, not the product o*d*d.
_TEXT_CHOICES = re.compile(r"^\s*\\(?:text|textbf|mathrm)\{\s*(\(?[A-Z]\)?(?:\s*,\s*\(?[A-Z]\)?)+)\s*\}\s*$")


def _braced(argument: str) -> str:
    return argument if argument.startswith("{") else "{" + argument + "}"


def normalize_answer(answer: str) -> str:
    """Rewrite the two forms math-verify misreads (see above); everything else is left to math-verify."""
    answer = _BRACELESS_FRAC.sub(lambda m: f"\\{m.group(1)}{_braced(m.group(2))}{_braced(m.group(3))}", answer)
    choices = _TEXT_CHOICES.match(answer)
    return choices.group(1) if choices else answer


# math_verify is imported lazily: it costs 1.5 s (python -X importtime, mostly sympy) and the parent
# process of a job never grades (its Grader workers do, after setting their memory limit).
def _extraction_config() -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # Boxed first: the strings we parse are always ``\boxed{<answer>}``.
    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def answers_equivalent(gold: str, answer: str) -> bool:
    """math-verify equivalence of two answer strings (box contents), WITHOUT a time limit.

    Call it directly only on trusted input; :class:`Grader` runs it under a hard limit.
    """
    from math_verify import parse, verify  # lazy: see _extraction_config

    _quiet_math_verify()
    config = _extraction_config()
    gold, answer = normalize_answer(gold), normalize_answer(answer)
    # Timeouts off here: signal.alarm is unreliable (see the module docstring); the caller limits time.
    gold_parsed = parse(f"\\boxed{{{gold}}}", config, parsing_timeout=None)
    answer_parsed = parse(f"\\boxed{{{answer}}}", config, parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def grade_unlimited(gold: str, generated: str) -> GradeResult:
    """Grade one output in this process, without a time limit (tests and trusted inputs)."""
    extracted = extract_answer(generated)
    if extracted is None:
        return GradeResult(None, False, "no_answer")
    return GradeResult(extracted, answers_equivalent(gold, extracted), "ok")


def _quiet_math_verify() -> None:
    # "Timeout is disabled" is expected here (the parent enforces the limit); keep logs clean.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _worker_main(conn: Connection, memory_limit_bytes: int | None) -> None:
    """Worker loop: receive ``(index, gold, answer)``, send ``(index, correct, status)``; None stops."""
    if memory_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    _quiet_math_verify()
    answers_equivalent("1", "1")  # warm up parser caches/imports before the first timed check
    conn.send(("ready", None, None))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, gold, answer = message
        try:
            correct, status = answers_equivalent(gold, answer), "ok"
        except Exception:  # math-verify catches most errors; anything left is "error", not a crash
            correct, status = False, "error"
        conn.send((index, correct, status))


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, memory_limit_bytes: int | None, start_timeout_s: float) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, memory_limit_bytes), daemon=True)
        self.process.start()
        child.close()
        self.item: int | None = None
        self.deadline = 0.0
        # Wait until imports are done so the first check's time limit does not include them.
        try:
            if not self.conn.poll(start_timeout_s):
                raise TimeoutError(f"not ready within {start_timeout_s:.0f}s")
            self.conn.recv()
        except (EOFError, OSError) as exc:
            self.kill()
            # spawn re-imports the parent's __main__: a script needs an `if __name__ == "__main__":` guard.
            raise RuntimeError(f"grading worker failed to start ({exc or type(exc).__name__})") from exc

    def submit(self, item: int, gold: str, answer: str, timeout_s: float) -> None:
        self.item = item
        self.deadline = time.monotonic() + timeout_s
        self.conn.send((item, gold, answer))

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # already dead: nothing to tell it
            self.conn.send(None)
        self.process.join(timeout=5)
        self.kill()


class Grader:
    """Grades outputs in ``workers`` processes, each check limited to ``timeout_s`` seconds.

    Use as a context manager (workers are started lazily and stopped on exit)::

        with Grader(timeout_s=5) as grader:
            results = grader.grade_many(golds, outputs)
            grader.timeouts  # checks that ran out of time so far
    """

    def __init__(
        self,
        timeout_s: float,
        workers: int = 1,
        *,
        memory_limit_bytes: int | None = WORKER_MEMORY_LIMIT_BYTES,
        start_timeout_s: float = 120.0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"eval.grade_timeout_s: must be > 0, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"grading workers: must be >= 1, got {workers}")
        self.timeout_s = float(timeout_s)
        self.num_workers = workers
        self.memory_limit_bytes = memory_limit_bytes
        self.start_timeout_s = start_timeout_s
        # spawn, not fork: the parent holds torch threads (and maybe CUDA), which fork would corrupt.
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self.timeouts = 0
        self.errors = 0

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self.memory_limit_bytes, self.start_timeout_s)

    def grade_many(self, golds: Sequence[str], outputs: Sequence[str]) -> list[GradeResult]:
        """Grade ``outputs[i]`` against ``golds[i]``; results in input order."""
        if len(golds) != len(outputs):
            raise ValueError(f"{len(golds)} gold answers but {len(outputs)} outputs")
        extracted = [extract_answer(text) for text in outputs]
        results: list[GradeResult | None] = [
            GradeResult(None, False, "no_answer") if answer is None else None for answer in extracted
        ]
        pending = [i for i, answer in enumerate(extracted) if answer is not None]
        if not pending:
            return results  # type: ignore[return-value]
        while len(self._workers) < min(self.num_workers, len(pending)):
            self._workers.append(self._new_worker())
        queue = list(reversed(pending))

        def finish(worker: _Worker, correct: bool, status: str) -> None:
            index = worker.item
            assert index is not None
            results[index] = GradeResult(extracted[index], correct, status)
            worker.item = None

        while queue or any(w.item is not None for w in self._workers):
            for worker in self._workers:
                if worker.item is None and queue:
                    index = queue.pop()
                    worker.submit(index, golds[index], extracted[index], self.timeout_s)  # type: ignore[arg-type]
            busy = [w for w in self._workers if w.item is not None]
            now = time.monotonic()
            ready = wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - now))
            for position, worker in enumerate(list(self._workers)):
                if worker.item is None:
                    continue
                if worker.conn in ready:
                    try:
                        _, correct, status = worker.conn.recv()
                    except (EOFError, OSError):  # the worker died (e.g. killed for memory)
                        correct, status = False, "error"
                        self._replace(position)
                    if status == "error":
                        self.errors += 1
                    finish(worker, correct, status)
                elif time.monotonic() >= worker.deadline:
                    self.timeouts += 1
                    finish(worker, False, "timeout")
                    self._replace(position)
        return results  # type: ignore[return-value]

    def _replace(self, position: int) -> None:
        self._workers[position].kill()
        self._workers[position] = self._new_worker()
