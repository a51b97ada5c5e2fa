"""Exception family of :mod:`swarmlm.curation`; every message names the field, file or row."""

from __future__ import annotations


class CurationError(Exception):
    """Base class of every error raised by the curation store, importers and signing."""


class LabelSchemaError(CurationError):
    """A label schema, task or annotation value does not fit its task set's schema."""


class NotFoundError(CurationError):
    """A task set, task, annotator or lease named by the caller does not exist."""


class ConflictError(CurationError):
    """The request is valid but contradicts the stored state (duplicate, expired lease...)."""


class AuthError(CurationError):
    """Wrong credentials, a disabled account or a revoked token."""


class WrongCredentialsError(AuthError):
    """The username or password is wrong (one class for both, so it leaks neither)."""


class ImportFormatError(CurationError):
    """An import file is malformed; the message names the file, line and field."""


class VerificationError(CurationError):
    """A signed export could not be read well enough to verify it."""
