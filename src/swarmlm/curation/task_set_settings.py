"""The settings of a task set: one pydantic model, from which every copy is read.

It has its own module, importing nothing of the store, so the replica record checks
(``replica.py``, below ``entities.py``) can validate a record body against it.
"""

from __future__ import annotations

from typing import Any

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from swarmlm.config import StrictModel
from swarmlm.curation.errors import CurationError


class TaskSetSettings(StrictModel):
    """How a task set collects labels: the one definition of these settings.

    Everything else reads its fields from here: the store's check and its ORM row
    (:func:`_task_set_info` reads a row back), the replicated ``task_set`` record's body
    (``replica.check_body``), the REST API's request and response bodies, the admin form
    and ``swarmlm curation create-set``. Adding a setting is a field here plus its column
    (``models.TaskSet`` and an Alembic migration). A replicated record that omits a setting
    (written by an older node) takes its default.

    The bounds are those of a new set: ``max_annotations`` of a stored set may later grow
    past 1000 (the data manager's ``raise_redundancy``), which is why values read back from
    the database are not validated again.
    """

    model_config = ConfigDict(frozen=True)

    k: int = Field(
        default=3, ge=1, le=100, description="annotations per task before consensus is tried"
    )
    # typed int although the default is None: the validator below resolves None to 2 * k,
    # so every instance holds a number
    max_annotations: int = Field(
        default=None,
        validate_default=True,
        ge=1,
        le=1000,
        description="cap on annotations per task while annotators disagree (default 2 * k)",
    )
    agreement_threshold: float = Field(
        default=0.6, ge=0.0, le=1.0, description="share of votes a label needs to win"
    )
    gold_share: float = Field(
        default=0.1, ge=0.0, le=1.0, description="probability of offering a gold (honeypot) task"
    )
    lease_seconds: int = Field(
        default=600, ge=10, le=7 * 86400, description="how long an annotator holds a task"
    )

    @field_validator("max_annotations", mode="before")
    @classmethod
    def _default_cap(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            return value
        k = info.data.get("k")
        # k invalid: its own error says so; a placeholder keeps a second, confusing error
        # ("max_annotations: not an integer") out of the message
        return 2 * k if isinstance(k, int) else 1000

    @model_validator(mode="after")
    def _cap_at_least_k(self) -> TaskSetSettings:
        if self.max_annotations < self.k:
            raise ValueError(
                f"max_annotations must be at least k={self.k}, got {self.max_annotations}"
            )
        return self

    @classmethod
    def parse(cls, values: Any, *, strict: bool = False) -> TaskSetSettings:
        """Validate ``values`` (a mapping of settings), raising :class:`CurationError` that
        names each bad setting: the store, the CLI and replication report it as their own
        error. ``strict``: no coercion (a replicated record's JSON types must be exact)."""
        try:
            return cls.model_validate(values, strict=strict)
        except ValidationError as exc:
            raise CurationError(settings_error_text(exc)) from None


def settings_error_text(exc: ValidationError) -> str:
    """``k: ...; gold_share: ...``: one clause per bad task-set setting."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        got = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        parts.append(f"{name}: {msg}{got}" if name else f"{msg.removeprefix('Value error, ')}")
    return "invalid task set settings: " + "; ".join(parts)


def settings_of(row: Any) -> TaskSetSettings:
    """The settings held by ``row`` (a ``task_sets`` ORM row, a :class:`TaskSetInfo`, an API
    body), read by field name and not validated again (see the class on stored caps)."""
    return TaskSetSettings.model_construct(
        **{name: getattr(row, name) for name in TaskSetSettings.model_fields}
    )


#: The fields of a replicated ``task_set`` record besides the settings.
RECORD_IDENTITY_FIELDS = ("name", "description", "schema")


def record_body(
    name: str, description: str, schema: dict[str, Any], settings: TaskSetSettings
) -> dict[str, Any]:
    """The body of a ``task_set`` record: its digest names the definition, so two nodes
    that define the same set (same name, schema and settings) make one set."""
    return {"name": name, "description": description, "schema": schema, **settings.model_dump()}


def settings_of_record(body: dict[str, Any]) -> TaskSetSettings:
    """The settings in a ``task_set`` record body, with exact JSON types (no coercion) and
    no unknown key; a setting the record omits takes its default."""
    part = {k: v for k, v in body.items() if k not in RECORD_IDENTITY_FIELDS}
    return TaskSetSettings.parse(part, strict=True)
