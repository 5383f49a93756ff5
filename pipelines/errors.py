"""Typed errors the engine raises. The UI translates them once, at the edge.

Every error carries a message a person can act on: it names the offending field or
file, the value given, and what is allowed.
"""

from __future__ import annotations

from typing import Any


class StencilError(Exception):
    """Base for every error that is the user's to fix (not a bug in Stencil)."""


class InvalidRequestError(StencilError, ValueError):
    """A request field is out of range or of the wrong kind."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={_short_repr(value)} is not allowed: {allowed}")

    def __reduce__(self):  # pickled with its own arguments: it crosses to a Ray front
        return type(self), (self.field, self.value, self.allowed)


class UnknownNameError(StencilError, KeyError):
    """A name (model, scheduler, control type, LoRA) that is not in its registry."""

    def __init__(self, kind: str, name: Any, known: list[str] | tuple[str, ...]):
        self.kind = kind
        self.name = name
        self.known = tuple(known)
        listed = ", ".join(self.known) if self.known else "none available"
        super().__init__(f"unknown {kind} {_short_repr(name)}; choose one of: {listed}")

    def __reduce__(self):
        return type(self), (self.kind, self.name, self.known)

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return self.args[0]


class ImageError(StencilError, ValueError):
    """An uploaded image that cannot be decoded or used."""


class ModelLoadError(StencilError, RuntimeError):
    """Weights that could not be found or loaded."""


class HubUnavailableError(StencilError, RuntimeError):
    """The server cannot fetch from the Hugging Face Hub for a user: turned off by the
    operator, or offline. The message says which; the request itself was well formed."""


class LoraRejectedError(StencilError, ValueError):
    """A LoRA file refused by validation, with the reason."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"LoRA {name!r} refused: {reason}")

    def __reduce__(self):
        return type(self), (self.name, self.reason)


class SettingsError(ValueError):
    """An environment variable or command-line option Stencil cannot start with (the
    operator's to fix, reported at start-up; lives here because reading the settings is
    what raises it)."""


class GenerationCancelled(StencilError):
    """The request was stopped by its owner; no image is produced."""


def megabytes(size: int) -> str:
    """A byte count as people read it in limits: "20 MB", "20.5 MB" (MB of 2**20 bytes),
    "64 KB", "10 bytes"."""
    if size < 2**10:
        return f"{size} bytes"
    if size < 2**20:
        return f"{size / 2**10:.0f} KB"
    value = size / 2**20
    return f"{value:.0f} MB" if value >= 10 or value.is_integer() else f"{value:.1f} MB"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
