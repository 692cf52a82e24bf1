"""Prompt weights in caption text, read as sd-scripts reads them for ``--weighted_captions``.

The syntax is AUTOMATIC1111's:

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` by 1/1.1; brackets nest and multiply.
* ``(text:1.3)`` multiplies it by 1.3 instead of 1.1 (a sign and decimal digits; ``[text:1.3]`` has no
  such meaning, its ``:1.3`` stays text).
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; any other backslash is dropped.
* A closing bracket with nothing open is literal text; a bracket still open at the end of the caption
  closes there (``(a`` is ``a`` at 1.1).

Weights are multiplied in the order the brackets close (inner first), then the unclosed round brackets, then
the unclosed square ones, with the factors sd-scripts uses, so the floats come out bit for bit as there.
Neighbouring pieces of equal weight are joined before tokenizing, so ``(a)(b)`` tokenizes as ``ab``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

# One lexical unit per match: an escape, a lone backslash, a bracket, an explicit weight that closes a
# round bracket, a run of plain text, or a colon that is not part of a weight.
_UNIT = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\])
  | (?P<backslash>\\)
  | (?P<open>[(\[])
  | :(?P<weight>[+-]?[.\d]+)\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)

Span = tuple[str, float]


def parse_prompt_weights(text: str) -> list[Span]:
    """The caption as (text, weight) spans, neighbours of equal weight joined; never empty."""
    pieces: list[list] = []  # [text, weight]; mutable so closing brackets can scale the pieces they enclose
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for unit in _UNIT.finditer(text):
        kind, value = unit.lastgroup, unit.group(0)
        if kind in ("escape", "backslash"):
            # A lone backslash leaves an empty piece, as in sd-scripts; it can keep two spans from joining.
            pieces.append([value[1:], 1.0])
        elif kind == "open":
            (open_round if value == "(" else open_square).append(len(pieces))
        elif kind == "weight" and open_round:
            scale_from(open_round.pop(), _weight_value(unit.group("weight"), text))
        elif kind == "close" and value == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif kind == "close" and value == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:
            pieces.append([value, 1.0])
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)
    return list(_join_equal_neighbours(pieces)) or [("", 1.0)]


def _weight_value(number: str, text: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise ValueError(f"weighted caption {text!r}: {number!r} is not a number") from None


def _join_equal_neighbours(pieces: list[list]) -> Iterator[Span]:
    run_text, run_weight = None, None
    for piece_text, weight in pieces:
        if run_text is not None and weight == run_weight:
            run_text += piece_text
            continue
        if run_text is not None:
            yield run_text, run_weight
        run_text, run_weight = piece_text, weight
    if run_text is not None:
        yield run_text, run_weight


def separator_inside_brackets(text: str, separator: str) -> bool:
    """Whether ``separator`` occurs inside an open weighting bracket, where splitting the caption into tags
    (caption shuffling, tag dropout) would cut a weighted span apart. Escaped brackets do not count."""
    open_round = open_square = 0
    for unit in _UNIT.finditer(text):
        kind, value = unit.lastgroup, unit.group(0)
        if value == "(":
            open_round += 1
        elif value == "[":
            open_square += 1
        elif (kind == "weight" or value == ")") and open_round:
            open_round -= 1
        elif value == "]" and open_square:
            open_square -= 1
        elif kind == "text" and (open_round or open_square) and separator in value:
            return True
    return False
