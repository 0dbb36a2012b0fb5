"""Final answers of MATH-style solutions: the content of the last ``\\boxed{...}`` or ``\\fbox{...}``.

The content is kept verbatim (``\\frac{1}{10}``, ``10,\\!080``, ``\\$42409``, ``\\text{(C)}``):
deciding whether two answers are equivalent is the grader's job, not the extractor's.
"""

from __future__ import annotations

import re

# ``\boxed`` or ``\fbox`` not followed by another letter (so ``\fboxsep`` is not a box).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# The brace-less form MATH uses now and then (``\boxed 5$``): one run up to whitespace or ``$``.
_BRACELESS_ARGUMENT = re.compile(r"[ \t]+([^\s${}]+)")


def _braced_content(text: str, open_index: int) -> str | None:
    """Content between ``text[open_index] == "{"`` and its matching ``}``; None when unbalanced."""
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":
            # An escaped character (``\{``, ``\}``, ``\\``) never opens or closes a group.
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
        index += 1
    return None


def extract_boxed_answer(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` in ``text`` (nested braces handled).

    Also accepts the brace-less ``\\boxed 5`` form. Returns None when there is no box, when the
    last box is unbalanced, or when it is empty.
    """
    if not text:
        return None
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    after = matches[-1].end()
    rest = text[after:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        content = _braced_content(text, after + len(rest) - len(stripped))
    else:
        braceless = _BRACELESS_ARGUMENT.match(rest)
        # Trailing sentence punctuation (``\boxed 5.``) is not part of the answer.
        content = braceless.group(1).rstrip(".,;") if braceless else None
    if content is None or not content.strip():
        return None
    return content.strip()
