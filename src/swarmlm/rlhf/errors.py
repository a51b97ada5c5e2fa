"""Errors of the alignment package; every message names the file, line or field at fault."""

from __future__ import annotations


class RLHFError(RuntimeError):
    """Base class for alignment errors."""


class PreferenceFormatError(RLHFError, ValueError):
    """A preference file is unreadable or a line is malformed (message names file and line)."""


class SafetyConfigError(RLHFError, ValueError):
    """A safety rule set is invalid (a bad pattern, an unreadable block list)."""


class ModelMismatchError(RLHFError):
    """Two models that must share a tokenizer or shape do not (names both checkpoints)."""
