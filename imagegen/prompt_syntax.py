"""AUTOMATIC1111's prompt syntax: `(word)` x1.1, `((word))`, `[word]` /1.1, `(word:1.3)`, `\\(`
for a literal bracket, and `BREAK` to start a new window of the text encoder.

Why our own parser: it is A1111's grammar, which compel (the library diffusers points to) does not
read (compel writes `word++` and `(word)1.3`, and weighs down by blending rather than A1111's
scaling). The grammar is small and fixed by A1111's behaviour, so it is parsed here, without torch
(the API checks prompts against the model's family before queueing); the engine encodes what it
returns (engine/prompts.py).
"""

from __future__ import annotations

import re

# A1111's multipliers for one level of round and square brackets.
UP, DOWN = 1.1, 1 / 1.1
BREAK = "BREAK"

TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: literal
    | \(                    # opens a weighted group
    | \[                    # opens a weakened group
    | :\s*([+-]?[.\d]+)\s*\)  # closes a group with an explicit weight
    | \)
    | \]
    | [^\\()\[\]:]+         # plain text
    | [:\\]                 # a colon or backslash that is not syntax
    """,
    re.X,
)
SPLIT_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) fragments in order, runs of one weight merged; a `BREAK` is
    the fragment ("BREAK", -1). Unclosed brackets weigh everything after them, as in A1111."""
    fragments: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in TOKEN.finditer(text):
        piece, weight = match[0], match[1]
        if piece.startswith("\\") and len(piece) == 2:
            fragments.append([piece[1], 1.0])
        elif piece == "(":
            rounds.append(len(fragments))
        elif piece == "[":
            squares.append(len(fragments))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif piece == ")" and rounds:
            scale(rounds.pop(), UP)
        elif piece == "]" and squares:
            scale(squares.pop(), DOWN)
        else:
            for i, part in enumerate(SPLIT_BREAK.split(piece)):
                if i:
                    fragments.append([BREAK, -1.0])
                fragments.append([part, 1.0])
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, DOWN)
    merged: list[list] = []
    for fragment in fragments or [["", 1.0]]:
        if merged and merged[-1][1] == fragment[1] and fragment[1] != -1:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(text, weight) for text, weight in merged]


def weighted(fragments: list[tuple[str, float]]) -> bool:
    """Whether the syntax changes anything: a weight other than 1, or a BREAK."""
    return any(weight != 1.0 for _text, weight in fragments)
