"""What a request must pass before it can queue work: the prompt rules and the generation budget.

Why screening normalises first: look-alike characters (full-width angle brackets, ligatures, odd
case) must hit the same rules as their plain forms, so every rule runs on the NFKC, case-folded
text. A refusal names the rule that fired, never echoes the prompt, and is logged with the request
id and client only. Why the budget is here and not in the HTTP limiter: it counts what a request
costs to generate, which only the generation service knows once the request is resolved.
"""

from __future__ import annotations

import logging
import math
import re
import time
import unicodedata
from functools import cache
from pathlib import Path

from limits import parse as parse_limit
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from config import Settings, comma_list
from imagegen.jobs import GenerationParams
from imagegen.refusals import Refusal

log = logging.getLogger(__name__)

# (rule name, pattern) on the normalised text; each is an idiom with no place in an image prompt.
SUSPICIOUS: tuple[tuple[str, str], ...] = (
    ("markup", r"<\s*/?\s*(script|iframe|object|embed|svg|img|style|link|meta|form|input|body|html)\b"),
    ("markup", r"\bjavascript\s*:|\bvbscript\s*:|\bdata\s*:\s*text/html"),
    ("markup", r"\bon[a-z]+\s*=\s*['\"]"),
    ("template", r"\{\{.*?\}\}|\{%.*?%\}|\$\{[^}]*\}|#\{[^}]*\}|<%.*?%>"),
    ("shell", r"\$\([^)]*\)|`[^`]*`|(;|&&|\|\|)\s*(rm|curl|wget|bash|sh|nc|cat|chmod|python)\b"),
    ("sql", r"'\s*or\s+'?[\w]+'?\s*=\s*'?[\w]+|\bunion\s+(all\s+)?select\b|;\s*(drop|delete|truncate|alter)\s+\w+"),
    ("sql", r"\b(drop|truncate)\s+table\b|\binsert\s+into\b.*\bvalues\b|'\s*;\s*--"),
    ("path_traversal", r"\.\.[/\\]|%2e%2e|/etc/(passwd|shadow)|\b[a-z]:\\windows\\"),
)
# Control characters other than ordinary whitespace, plus invisible format characters.
_ALLOWED_CONTROLS = {"\n", "\r", "\t"}


class PromptRejected(Refusal):
    """A prompt that broke a screening rule; `details.rule` names the rule."""

    code = "prompt_rejected"

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(f"`{field}` {message}", field, details={"rule": rule})


class BudgetSpent(Refusal):
    """The client's RATE_LIMIT_COST window is spent; `retry_after` says when it has room again."""

    code = "rate_limited"


def normalise(text: str) -> str:
    """The form every rule sees: without format characters (zero-width spaces, soft hyphens: invisible,
    they would split a blocked word), NFKC-normalised and case-folded."""
    visible = "".join(char for char in text if unicodedata.category(char) != "Cf")
    return unicodedata.normalize("NFKC", visible).casefold()


@cache
def _rules(blocked_patterns_file: Path | None, blocked_words: str) -> tuple[tuple[str, re.Pattern[str]], ...]:
    rules = [(name, re.compile(pattern, re.DOTALL)) for name, pattern in SUSPICIOUS]
    if blocked_patterns_file:
        for line in blocked_patterns_file.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                rules.append(("blocked_pattern", re.compile(normalise(line.strip()), re.DOTALL)))
    for word in comma_list(blocked_words):
        rules.append(("blocked_word", re.compile(rf"\b{re.escape(normalise(word))}\b")))
    return tuple(rules)


# The operator's own rules (BLOCKED_WORDS, BLOCKED_PATTERNS_FILE), which `moderation: low` leaves out.
OPERATORS_RULES = ("blocked_word", "blocked_pattern")


def screen_prompt(field: str, text: str, settings: Settings, client: str = "-", moderation: str = "auto") -> None:
    """Raises PromptRejected naming the rule a prompt breaks; returns quietly otherwise. With
    `moderation` low (where ALLOW_LOW_MODERATION allows it), the operator's rules are not applied."""

    def reject(rule: str, message: str) -> None:
        log.warning("prompt rejected: field=%s rule=%s client=%s", field, rule, client)
        raise PromptRejected(field, rule, message)

    if field == "prompt" and not normalise(text).strip():  # blank, or only invisible characters
        reject("empty", "must not be empty")
    if len(text) > settings.max_prompt_length:
        reject("too_long", f"must be at most {settings.max_prompt_length} characters, got {len(text)}")
    for char in text:
        if char not in _ALLOWED_CONTROLS and unicodedata.category(char) in {"Cc", "Cs", "Co"}:
            reject("control_character", "must not contain control characters")
    folded = normalise(text)
    for rule, pattern in _rules(settings.blocked_patterns_file, settings.blocked_words):
        if moderation == "low" and rule in OPERATORS_RULES:
            continue
        if pattern.search(folded):
            reject(rule, f"was refused by the `{rule}` rule")


def generation_cost(params: GenerationParams) -> int:
    """What a generation counts against RATE_LIMIT_COST: megapixel-steps (width x height x steps
    run x images / 10^6; an edit runs about strength x steps; hires fix's second pass at its own
    size), at least 1."""
    first = params.width * params.height * (params.steps_run or params.steps)
    second = params.hires_width * params.hires_height * params.hires_steps_run
    return max(1, math.ceil((first + second) * len(params.seeds) / 1e6))


class CostBudget:
    """RATE_LIMIT_COST: a budget of megapixel-steps per client and window, kept where the rate
    limits are (RATE_LIMIT_STORAGE_URI), so every replica of a cluster counts against one budget."""

    NAMESPACE = "imagegen-cost"

    def __init__(self, storage_uri: str) -> None:
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))

    def check(self, budget: str, params: GenerationParams, client: str) -> int:
        """The request's cost, when the client's window has room for it: a 400 naming `steps` for one
        that costs more than a whole window allows, BudgetSpent while the window is spent."""
        if budget == "off":
            return 0
        limit, cost = parse_limit(budget), generation_cost(params)
        if cost > limit.amount:
            raise Refusal(
                f"This request costs {cost} megapixel-steps (width x height x steps x images / 10^6), more than "
                f"RATE_LIMIT_COST allows in a window ({budget}); ask for fewer or smaller images, or fewer steps.",
                "steps",
                details={"cost": cost},
            )
        if not self.limiter.test(limit, self.NAMESPACE, client, cost=cost):
            reset = self.limiter.get_window_stats(limit, self.NAMESPACE, client).reset_time
            raise BudgetSpent(
                f"Over your generation budget ({budget} megapixel-steps, RATE_LIMIT_COST); this request costs {cost}.",
                details={"cost": cost},
                retry_after=max(1, math.ceil(reset - time.time())),
            )
        return cost

    def charge(self, budget: str, cost: int, client: str) -> None:
        """Counts a checked request's cost against the client's window."""
        if budget != "off":
            self.limiter.hit(parse_limit(budget), self.NAMESPACE, client, cost=cost)
