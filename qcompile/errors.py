"""Error lines a user reads: one line, at most ``MAX_LINE`` characters, lists grouped by kind.

* ``one_line(text)``: whitespace collapsed to single spaces; a longer text keeps its beginning (what is
  wrong) and its end (the fix) around a " ... " cut.
* ``group_items(kinds, examples)``: ``"37 unsupported ...: Hardswish x12 (features.0.2 at m.py:10, ...),
  Hardsigmoid x9, mul x9"``: one entry per kind, most frequent first, the first examples of the leading
  kinds in parentheses, within a character budget; the full list stays on the exception (``details``)
  for ``--debug``.
Argparse's errors become one such line in ``qcompile/cli_usage.py``.
"""

from __future__ import annotations

from collections import Counter

MAX_LINE = 300
_CUT = " ... "


class QCompileError(Exception):
    """Base of every error qcompile reports to a user; its message is one line that names a fix."""


def one_line(text: str, limit: int = MAX_LINE) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    tail = min(110, limit // 3)
    head = limit - tail - len(_CUT)
    return text[:head].rstrip() + _CUT + text[-tail:].lstrip()


def group_items(kinds: list[str], examples: list[str], budget: int = 160, shown_kinds: int = 3) -> str:
    """Kinds with counts, most frequent first; two examples of the first kind, one of the next ones."""
    counts = Counter(kinds)
    order = sorted(counts, key=lambda k: (-counts[k], kinds.index(k)))
    parts: list[str] = []
    for i, kind in enumerate(order):
        entry = kind + (f" x{counts[kind]}" if counts[kind] > 1 else "")
        if i < shown_kinds:
            per_kind = 2 if i == 0 else 1
            firsts = [e for k, e in zip(kinds, examples, strict=True) if k == kind][:per_kind]
            entry += f" ({', '.join(firsts)}{', ...' if counts[kind] > per_kind else ''})"
        rest = f"and {len(order) - i} more kind(s)"
        if parts and len(", ".join([*parts, entry])) > budget - (len(rest) + 2 if i + 1 < len(order) else 0):
            parts.append(rest)
            break
        parts.append(entry if len(entry) <= budget else entry[: budget - 4] + "...)")
    return ", ".join(parts)

