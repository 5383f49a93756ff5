"""Text forms of a LoRA set: `"name:0.8, other"` strings and A1111-style `<lora:name:0.8>` tags.

Pure parsing: names are not looked up here (the catalogue does that), so these functions
need neither the catalogue nor the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .errors import InvalidRequestError
from .requests import LoraChoice

LORA_STRING_HINT = "write name:weight pairs separated by commas, e.g. 'tiny-ink:0.8, tiny-neon'"
PROMPT_TAG_RE = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)

NameAndWeight = tuple[str, float | None]  # weight None: the entry's default weight


def split_lora_string(text: str | None) -> tuple[NameAndWeight, ...]:
    """`"a:0.8, b"` -> (("a", 0.8), ("b", None)); empty or blank text -> ()."""
    if text is None or not text.strip():
        return ()
    if not isinstance(text, str):
        raise InvalidRequestError("loras", text, LORA_STRING_HINT)
    return tuple(_split_pair(part.strip(), text) for part in text.split(","))


def split_prompt_lora_tags(prompt: str) -> tuple[str, tuple[NameAndWeight, ...]]:
    """Remove `<lora:name>` / `<lora:name:weight>` tags; returns the prompt and the pairs."""
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt", prompt, "must be text")
    pairs = []
    for match in PROMPT_TAG_RE.finditer(prompt):
        body = match.group(1)
        if body.count(":") > 1:
            raise InvalidRequestError(
                "prompt", match.group(0), "use <lora:name> or <lora:name:weight>"
            )
        pairs.append(_split_pair(body.strip(), match.group(0)))
    return _tidy_after_tags(PROMPT_TAG_RE.sub(" ", prompt)), tuple(pairs)


def check_unique(choices: Sequence[LoraChoice]) -> None:
    """Refuse a set that names one LoRA twice (which weight would the user mean?)."""
    names = [choice.name for choice in choices]
    if len(set(names)) != len(names):
        raise InvalidRequestError("loras", names, "each LoRA may appear once")


def _tidy_after_tags(prompt: str) -> str:
    # A removed tag leaves its separators behind: "a cat <lora:x>, sunny" -> "a cat, sunny".
    cleaned = re.sub(r"[ \t]{2,}", " ", prompt)
    cleaned = re.sub(r"\s+,", ",", cleaned)
    return re.sub(r",(\s*,)+", ",", cleaned).strip(" \t\n,")


def _split_pair(part: str, whole: str) -> NameAndWeight:
    name, colon, weight_text = part.partition(":")
    name = name.strip()
    if not name or ":" in weight_text:
        raise InvalidRequestError("loras", whole, LORA_STRING_HINT)
    if not colon:
        return name, None
    try:
        weight = float(weight_text.strip())
    except ValueError:
        raise InvalidRequestError("loras", whole, LORA_STRING_HINT) from None
    if not math.isfinite(weight):
        raise InvalidRequestError("loras", whole, "weights must be finite numbers")
    return name, weight
