"""What counts as "the same problem": one normalisation and one hash, shared by splitting and MATH-500 matching."""

from __future__ import annotations

import hashlib
import unicodedata


def normalise_problem_text(text: str) -> str:
    """Unicode-normalised (NFKC), case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def problem_sha256(text: str) -> str:
    """Hex sha256 of the UTF-8 normalised problem text: identifies a problem where no file name does."""
    return hashlib.sha256(normalise_problem_text(text).encode("utf-8")).hexdigest()
