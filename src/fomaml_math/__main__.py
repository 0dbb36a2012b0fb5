"""``python -m fomaml_math <stage> ...``: one entry point per stage, as the Snakemake rules call them."""

from __future__ import annotations

import importlib
import sys

from fomaml_math.errors import ConfigError

# stage command -> module whose ``main(argv) -> int`` runs it; imported on dispatch, so a stage pays only for its own
# dependencies (torch, transformers, scipy: seconds each), not for every stage's
STAGES: dict[str, str] = {
    "check-env": "fomaml_math.envcheck",
    "ingest": "fomaml_math.data.ingest",
    "split-tasks": "fomaml_math.data.split",
    "build-tiny-model": "fomaml_math.tiny_model",
    "pretrain-tiny-base": "fomaml_math.pretrain",
    "train-fomaml": "fomaml_math.training.fomaml",
    "train-sft": "fomaml_math.training.sft",
    "calibrate": "fomaml_math.evaluation.calibrate",
    "evaluate": "fomaml_math.evaluation.fewshot",
    "stats": "fomaml_math.analysis.stats",
    "figures": "fomaml_math.analysis.figures",
    "summary": "fomaml_math.analysis.summary",
    "experiments": "fomaml_math.analysis.experiments",
    "manifest": "fomaml_math.manifest",
    "plan": "fomaml_math.plan",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: python -m fomaml_math <stage> [options]\nstages: " + ", ".join(STAGES), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(STAGES[argv[0]])
    try:
        return int(module.main(argv[1:]) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
