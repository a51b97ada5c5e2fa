"""Label schemas of task sets, and validation of tasks and annotation values against them.

A task set has exactly one schema. Values are plain JSON so that they can be stored, signed
(canonical msgpack) and exported without conversion:

==================  ==============================================  ==========================
kind                value                                           task needs
==================  ==============================================  ==========================
single_choice       one of ``choices`` (str)                        content
multiple_choice     list of distinct ``choices``, in schema order   content
rating              int in ``[min, max]``                           content
free_text           non-blank str of at most ``max_length`` chars   content
pairwise            ``"A"``, ``"B"``, ``"tie"`` or ``"both_bad"``    exactly 2 outputs
ranking             permutation of ``0..k-1``, best first           exactly ``k`` outputs
==================  ==============================================  ==========================
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from swarmlm.config import StrictModel
from swarmlm.curation.errors import LabelSchemaError

PAIRWISE_VALUES: tuple[str, ...] = ("A", "B", "tie", "both_bad")


class _Schema(StrictModel):
    """A label schema: strict, and frozen because parsed schemas are cached and shared."""

    model_config = ConfigDict(frozen=True)


class SingleChoiceSchema(_Schema):
    kind: Literal["single_choice"] = "single_choice"
    choices: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=2, max_length=50
    )

    @model_validator(mode="after")
    def _distinct(self) -> SingleChoiceSchema:
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"choices must be distinct, got {self.choices}")
        return self


class MultipleChoiceSchema(_Schema):
    kind: Literal["multiple_choice"] = "multiple_choice"
    choices: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=50
    )

    @model_validator(mode="after")
    def _distinct(self) -> MultipleChoiceSchema:
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"choices must be distinct, got {self.choices}")
        return self


class RatingSchema(_Schema):
    kind: Literal["rating"] = "rating"
    min: int = 1
    max: int = 5

    @model_validator(mode="after")
    def _range(self) -> RatingSchema:
        if not self.min < self.max:
            raise ValueError(f"rating needs min < max, got min={self.min} max={self.max}")
        if self.max - self.min > 100:
            raise ValueError("rating range is limited to 101 points")
        return self


class FreeTextSchema(_Schema):
    kind: Literal["free_text"] = "free_text"
    max_length: int = Field(default=2000, ge=1, le=100_000)


class PairwiseSchema(_Schema):
    kind: Literal["pairwise"] = "pairwise"


class RankingSchema(_Schema):
    kind: Literal["ranking"] = "ranking"
    k: int = Field(ge=2, le=9)


LabelSchema = Annotated[
    SingleChoiceSchema
    | MultipleChoiceSchema
    | RatingSchema
    | FreeTextSchema
    | PairwiseSchema
    | RankingSchema,
    Field(discriminator="kind"),
]
_SCHEMA_ADAPTER: TypeAdapter[LabelSchema] = TypeAdapter(LabelSchema)

SCHEMA_KINDS: tuple[str, ...] = (
    "single_choice",
    "multiple_choice",
    "rating",
    "free_text",
    "pairwise",
    "ranking",
)
CATEGORICAL_KINDS: frozenset[str] = frozenset({"single_choice", "pairwise"})


def parse_schema(raw: Any) -> LabelSchema:
    """Validate a schema given as a dict (or an already-built schema object)."""
    if isinstance(
        raw,
        SingleChoiceSchema
        | MultipleChoiceSchema
        | RatingSchema
        | FreeTextSchema
        | PairwiseSchema
        | RankingSchema,
    ):
        return raw
    try:
        return _SCHEMA_ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise LabelSchemaError(f"invalid label schema: {_pydantic_message(e)}") from e


def schema_to_dict(schema: LabelSchema) -> dict[str, Any]:
    out: dict[str, Any] = schema.model_dump(mode="json")
    return out


def categories(schema: LabelSchema) -> list[str]:
    """The class names of a categorical schema, in a fixed order (class index = position)."""
    if isinstance(schema, SingleChoiceSchema):
        return list(schema.choices)
    if isinstance(schema, PairwiseSchema):
        return list(PAIRWISE_VALUES)
    raise LabelSchemaError(f"schema kind {schema.kind!r} is not categorical")


def n_outputs_required(schema: LabelSchema) -> int | None:
    if isinstance(schema, PairwiseSchema):
        return 2
    if isinstance(schema, RankingSchema):
        return schema.k
    return None


def validate_value(schema: LabelSchema, value: Any, field: str = "value") -> Any:
    """Return ``value`` normalised for ``schema`` or raise naming ``field`` and the rule broken."""
    if isinstance(schema, SingleChoiceSchema):
        if not isinstance(value, str) or value not in schema.choices:
            raise LabelSchemaError(f"{field} must be one of {schema.choices}, got {value!r}")
        return value
    if isinstance(schema, MultipleChoiceSchema):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise LabelSchemaError(f"{field} must be a list of choices, got {value!r}")
        if not value:
            # An empty answer says nothing about the task, yet would earn a point.
            raise LabelSchemaError(f"{field} must pick at least one of {schema.choices}")
        unknown = [v for v in value if v not in schema.choices]
        if unknown:
            raise LabelSchemaError(
                f"{field} has unknown choices {unknown}; allowed {schema.choices}"
            )
        if len(set(value)) != len(value):
            raise LabelSchemaError(f"{field} repeats a choice: {value}")
        return [c for c in schema.choices if c in value]
    if isinstance(schema, RatingSchema):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value.strip())
            else:
                raise LabelSchemaError(f"{field} must be an integer rating, got {value!r}")
        if not schema.min <= value <= schema.max:
            raise LabelSchemaError(
                f"{field} must be between {schema.min} and {schema.max}, got {value}"
            )
        return value
    if isinstance(schema, FreeTextSchema):
        if not isinstance(value, str) or not value.strip():
            raise LabelSchemaError(f"{field} must be non-empty text")
        if len(value) > schema.max_length:
            raise LabelSchemaError(
                f"{field} is {len(value)} characters, longer than {schema.max_length}"
            )
        return value
    if isinstance(schema, PairwiseSchema):
        if value not in PAIRWISE_VALUES:
            raise LabelSchemaError(f"{field} must be one of {list(PAIRWISE_VALUES)}, got {value!r}")
        return value
    if isinstance(schema, RankingSchema):
        if (
            not isinstance(value, list)
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
            or sorted(value) != list(range(schema.k))
        ):
            raise LabelSchemaError(
                f"{field} must be a permutation of 0..{schema.k - 1} (best first), got {value!r}"
            )
        return list(value)
    raise LabelSchemaError(f"unknown schema {schema!r}")  # pragma: no cover


def validate_task(
    schema: LabelSchema, content: Any, outputs: Any, gold: Any, where: str = "task"
) -> tuple[Any, list[str] | None, Any]:
    """Check a task against its schema; returns ``(content, outputs, gold)`` normalised."""
    if content is None or (isinstance(content, str) and not content.strip()):
        raise LabelSchemaError(f"{where}: content is missing or empty")
    if not isinstance(content, str | dict | list):
        raise LabelSchemaError(f"{where}: content must be text or a JSON object/list")
    for name, part in (("content", content), ("gold", gold)):
        if not _finite(part):
            raise LabelSchemaError(
                f"{where}: {name} holds NaN or Infinity, which JSON cannot carry"
            )
    need = n_outputs_required(schema)
    if outputs is not None and (
        not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs)
    ):
        raise LabelSchemaError(f"{where}: outputs must be a list of strings")
    if need is not None and (outputs is None or len(outputs) != need):
        got = "none" if outputs is None else str(len(outputs))
        raise LabelSchemaError(f"{where}: schema {schema.kind} needs {need} outputs, got {got}")
    if gold is not None:
        gold = validate_value(schema, gold, field=f"{where}: gold")
    return content, outputs, gold


def _finite(value: Any, depth: int = 0) -> bool:
    """No NaN or infinity anywhere inside ``value`` (exports must stay valid JSON)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if depth > 64:
        return True  # deeper nesting is refused by the JSON layers before it gets here
    if isinstance(value, dict):
        return all(_finite(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v, depth + 1) for v in value)
    return True


def _pydantic_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "schema"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
