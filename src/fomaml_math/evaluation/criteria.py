"""The tuner's criteria on one task's dev examples: full-solution NLL, final-answer NLL, greedy accuracy.

* ``nll``: the token-weighted NLL of the whole worked solution (what training minimises);
* ``answer_nll``: the token-weighted NLL of the final answer's tokens only (the content of the
  solution's last ``\\boxed{}``, located by re-tokenising the target text up to the answer's start
  and end; an example without a boxed answer does not count);
* ``accuracy``: greedy generation from the evaluation's own prompt, graded like the evaluation.

The evaluation's metric is accuracy; the two NLLs are cheaper proxies, and on the demo the full NLL
disagrees with it (docs/evaluation.md, "Tuning"), so ``calibration.criterion`` defaults to ``accuracy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fomaml_math.batching import (
    IGNORE_INDEX,
    SFTBatch,
    chat_messages,
    chat_prompt,
    collate,
    encode_example,
    token_nll,
)
from fomaml_math.data.answers import extract_boxed_answer
from fomaml_math.evaluation.generate import HFBackend, encode_prompts
from fomaml_math.evaluation.job import JobModel
from fomaml_math.evaluation.prompts import problem_messages

CRITERIA: tuple[str, ...] = ("accuracy", "answer_nll", "nll")
HIGHER_IS_BETTER: dict[str, bool] = {"accuracy": True, "answer_nll": False, "nll": False}


@dataclass(frozen=True)
class Generation:
    """How the accuracy criterion generates and grades (the evaluation's own settings)."""

    max_new_tokens: int
    batch_size: int
    context_limit: int | None


@dataclass
class DevExamples:
    """The tuning examples of one task, ready for every criterion."""

    task: str
    chunks: list[SFTBatch]  # the full solution is the target
    answer_targets: list[torch.Tensor]  # per chunk, over its targets (token_nll's order): an answer token?
    prompt_ids: list[list[int]]  # the evaluation's prompt of each problem
    golds: list[str]


@dataclass(frozen=True)
class Score:
    """One task's criteria at the current weights (sums, so draws and tasks pool exactly)."""

    nll_sum: float
    nll_tokens: int
    answer_sum: float
    answer_tokens: int
    correct: tuple[bool, ...] | None  # per example; None where accuracy was not measured


def answer_span(tokenizer: Any, problem: str, solution: str, *, instruction: str) -> tuple[int, int] | None:
    """Target-token positions [start, end) of the final answer of ``solution`` (None without ``\\boxed{}``)."""
    answer = extract_boxed_answer(solution)
    if not answer:
        return None
    prompt = chat_prompt(tokenizer, problem, instruction=instruction)
    full = tokenizer.apply_chat_template(chat_messages(problem, solution, instruction=instruction), tokenize=False)
    target = full[len(prompt) :]
    start = target.rfind(answer)
    if start < 0:
        return None

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    first, last = length(target[:start]), length(target[: start + len(answer)])
    return (first, last) if last > first else None


def dev_examples(
    tokenizer: Any, task: str, frame: pd.DataFrame, *, max_examples: int, max_seq_len: int, instruction: str,
    chunk_size: int,
) -> DevExamples:  # fmt: skip
    """The first ``max_examples`` rows of ``frame`` (a task's dev_monitor, sorted by id) for every criterion."""
    rows = frame.iloc[:max_examples]
    problems, solutions = rows["problem"].astype(str).tolist(), rows["solution"].astype(str).tolist()
    encoded = [encode_example(tokenizer, p, s, max_seq_len, instruction=instruction)
               for p, s in zip(problems, solutions, strict=True)]  # fmt: skip
    pad = tokenizer.pad_token_id
    chunks = [collate(encoded[i : i + chunk_size], pad) for i in range(0, len(encoded), chunk_size)]
    spans = [answer_span(tokenizer, p, s, instruction=instruction) for p, s in zip(problems, solutions, strict=True)]
    answer_targets = []
    for start, chunk in zip(range(0, len(encoded), chunk_size), chunks, strict=True):
        is_answer = torch.zeros_like(chunk.labels, dtype=torch.bool)
        for row, span in enumerate(spans[start : start + chunk_size]):
            if span is not None:
                offset = encoded[start + row].prompt_len
                is_answer[row, offset + span[0] : offset + span[1]] = True
        targets = chunk.labels[:, 1:] != IGNORE_INDEX  # a truncated answer keeps only its kept tokens
        answer_targets.append(is_answer[:, 1:][targets])
    prompts = [problem_messages(p, instruction=instruction) for p in problems]
    golds = [extract_boxed_answer(s) or "" for s in solutions]  # the table's `answer` is defined the same way
    return DevExamples(task, chunks, answer_targets, encode_prompts(tokenizer, prompts), golds)


def score(job: JobModel, examples: DevExamples, *, grader: Any, generation: Generation | None) -> Score:
    """The criteria at the model's current weights; accuracy only with ``generation``."""
    nll_sum = answer_sum = 0.0
    nll_tokens = answer_tokens = 0
    for chunk, is_answer in zip(examples.chunks, examples.answer_targets, strict=True):
        with job.autocast():
            nll = token_nll(job.model, chunk.to(job.device))  # one forward for both NLLs
        nll_sum, nll_tokens = nll_sum + float(nll.sum()), nll_tokens + int(nll.numel())
        answer_sum, answer_tokens = answer_sum + float(nll[is_answer].sum()), answer_tokens + int(is_answer.sum())
    correct = None
    if generation is not None:
        outputs = HFBackend(job.autocast).generate(
            job.model, job.tokenizer, examples.prompt_ids, max_new_tokens=generation.max_new_tokens,
            batch_size=generation.batch_size, max_context=generation.context_limit,
        )  # fmt: skip
        correct = tuple(bool(g.correct) for g in grader.grade_many(examples.golds, outputs.texts))
    return Score(nll_sum, nll_tokens, answer_sum, answer_tokens, correct)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant or too short."""
    a, b = pd.Series(list(x), dtype=float), pd.Series(list(y), dtype=float)
    keep = a.notna() & b.notna()
    a, b = a[keep].rank(), b[keep].rank()
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(a.to_numpy(), b.to_numpy())[0, 1])
