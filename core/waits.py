"""Nodes that wait for input: the compiled ``wait`` block and the validation of inputs.

A node's ``wait`` block names what a run waiting there accepts: a JSON Schema
(``input_schema``) or a registered Pydantic model (``input_model``). Both
compile, when the graph is validated, into one pydantic-core validator, so an
input is checked in linear time in Rust, with every problem reported at its
JSON path, whatever the schema says.

JSON Schema is accepted in the subset that compiles to such a validator:
``type`` (one or a list), ``properties``, ``required``,
``additionalProperties`` (true or false), ``items``, ``enum``, ``const``,
``minLength``/``maxLength``, ``pattern`` (regular expressions are matched
without backtracking, so no pattern can be slow), ``minimum``/``maximum`` and
their exclusive forms, ``multipleOf``, ``minItems``/``maxItems``, ``anyOf``,
and the annotations ``title``, ``description``, ``default``, ``examples``,
``$schema``, ``$comment``. Anything else (``$ref``, ``oneOf``, ``allOf``,
``not``, ``format``, ``patternProperties``, ...) is a validation problem of
the graph, not silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import pydantic_core
from pydantic import BaseModel
from pydantic_core import CoreSchema, SchemaValidator, core_schema

from .errors import InputValidationError, Problem

#: Deepest nesting an input schema may have.
MAX_SCHEMA_DEPTH = 16

_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$comment"})
_KEYWORDS = _ANNOTATIONS | {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "anyOf",
}
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


class SchemaProblem(Exception):
    """Internal: a part of an input schema outside the supported subset."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _number(value: Any, path: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SchemaProblem(f"{path}.{key}", f"{key} must be a number")
    return value


def _count(value: Any, path: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaProblem(f"{path}.{key}", f"{key} must be an integer >= 0")
    return value


def _optional_count(schema: Mapping[str, Any], path: str, key: str) -> int | None:
    return _count(schema[key], path, key) if key in schema else None


def _typed(kind: str, schema: Mapping[str, Any], path: str, depth: int) -> CoreSchema:
    """The validator of one JSON type, with the keywords that apply to it."""
    if kind == "string":
        pattern = schema.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise SchemaProblem(f"{path}.pattern", "pattern must be a string")
            try:
                SchemaValidator(core_schema.str_schema(pattern=pattern))
            except pydantic_core.SchemaError as exc:
                raise SchemaProblem(f"{path}.pattern", f"not a usable pattern: {exc}") from None
        return core_schema.str_schema(
            strict=True,
            min_length=_optional_count(schema, path, "minLength"),
            max_length=_optional_count(schema, path, "maxLength"),
            pattern=pattern,
        )
    if kind in ("integer", "number"):
        bounds: dict[str, Any] = {}
        for key, name in (
            ("minimum", "ge"),
            ("maximum", "le"),
            ("exclusiveMinimum", "gt"),
            ("exclusiveMaximum", "lt"),
            ("multipleOf", "multiple_of"),
        ):
            if key in schema:
                bounds[name] = _number(schema[key], path, key)
        if kind == "integer":
            return core_schema.int_schema(strict=True, **bounds)
        return core_schema.float_schema(strict=True, allow_inf_nan=False, **bounds)
    if kind == "boolean":
        return core_schema.bool_schema(strict=True)
    if kind == "null":
        return core_schema.none_schema()
    if kind == "array":
        items = schema.get("items")
        item = (
            core_schema.any_schema()
            if items is None
            else _compile(items, f"{path}.items", depth + 1)
        )
        return core_schema.list_schema(
            item,
            strict=True,
            min_length=_optional_count(schema, path, "minItems"),
            max_length=_optional_count(schema, path, "maxItems"),
        )
    # object
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        raise SchemaProblem(f"{path}.properties", "properties must be an object")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaProblem(f"{path}.required", "required must be a list of property names")
    additional = schema.get("additionalProperties", True)
    if not isinstance(additional, bool):
        raise SchemaProblem(
            f"{path}.additionalProperties", "additionalProperties must be true or false"
        )
    if not properties:
        if not additional:
            return core_schema.typed_dict_schema({}, extra_behavior="forbid", strict=True)
        return core_schema.dict_schema(
            core_schema.str_schema(), core_schema.any_schema(), strict=True
        )
    fields = {
        name: core_schema.typed_dict_field(
            _compile(sub, f"{path}.properties.{name}", depth + 1), required=name in required
        )
        for name, sub in properties.items()
    }
    for name in required:
        if name not in fields:
            fields[name] = core_schema.typed_dict_field(core_schema.any_schema(), required=True)
    return core_schema.typed_dict_schema(
        fields, extra_behavior="allow" if additional else "forbid", strict=True
    )


def _compile(schema: Any, path: str, depth: int = 0) -> CoreSchema:
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaProblem(path, f"the schema nests more than {MAX_SCHEMA_DEPTH} levels")
    if schema is True or schema == {}:
        return core_schema.any_schema()
    if not isinstance(schema, Mapping):
        raise SchemaProblem(path, "a schema must be an object")
    unknown = sorted(set(schema) - _KEYWORDS)
    if unknown:
        raise SchemaProblem(
            f"{path}.{unknown[0]}",
            f"{unknown[0]!r} is not supported in input schemas (supported: "
            f"{', '.join(sorted(_KEYWORDS - _ANNOTATIONS))})",
        )
    choices: list[CoreSchema] = []
    if "const" in schema:
        choices.append(core_schema.literal_schema([schema["const"]]))
    elif "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaProblem(f"{path}.enum", "enum must be a non-empty list")
        choices.append(core_schema.literal_schema(values))
    elif "anyOf" in schema:
        options = schema["anyOf"]
        if not isinstance(options, list) or not options:
            raise SchemaProblem(f"{path}.anyOf", "anyOf must be a non-empty list")
        alternatives: list[CoreSchema | tuple[CoreSchema, str]] = [
            _compile(o, f"{path}.anyOf[{i}]", depth + 1) for i, o in enumerate(options)
        ]
        choices.append(core_schema.union_schema(alternatives))
    kinds = schema.get("type")
    if kinds is not None:
        listed = kinds if isinstance(kinds, list) else [kinds]
        if not listed or any(k not in _TYPES for k in listed):
            raise SchemaProblem(f"{path}.type", f"type must be one or more of {', '.join(_TYPES)}")
        typed: list[CoreSchema | tuple[CoreSchema, str]] = [
            _typed(k, schema, path, depth) for k in listed
        ]
        checked = (
            _typed(listed[0], schema, path, depth)
            if len(listed) == 1
            else (core_schema.union_schema(typed))
        )
        # A type beside enum/const/anyOf: both must hold.
        choices = [core_schema.chain_schema([checked, c]) for c in choices] or [checked]
    if not choices:
        return core_schema.any_schema()
    return choices[0]


def _json_path(loc: tuple[int | str, ...]) -> str:
    path = "$"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


InputKind = Literal["schema", "model", "any"]


class _Validator(Protocol):
    """A pydantic-core validator (a model's, or one compiled from a schema)."""

    def validate_python(self, input: Any, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class WaitPlan:
    """A compiled ``wait`` block. Immutable; build it with :func:`compile_wait`.

    Attributes:
        prompt: what a person is asked.
        input_schema: the JSON Schema shown to whoever answers (the model's,
            for ``input_model``; ``None`` when any object is accepted).
        timeout_s: seconds until the wait times out (``None``: never).
        on_timeout_input: the input a timeout resumes with; ``None``: the
            run fails.
    """

    prompt: str
    input_schema: dict[str, Any] | None
    timeout_s: float | None
    on_timeout_input: dict[str, Any] | None
    validator: _Validator
    kind: InputKind

    def check(self, value: Any) -> dict[str, Any]:
        """The input as it merges into the state.

        Raises:
            InputValidationError: with every problem, each at its JSON path.
        """
        if not isinstance(value, Mapping):
            problem = Problem("invalid_type", "$", "the input must be an object")
            raise InputValidationError([problem])
        try:
            checked = self.validator.validate_python(dict(value))
        except pydantic_core.ValidationError as exc:
            problems = [
                Problem(err["type"], _json_path(tuple(err["loc"])), err["msg"])
                for err in exc.errors(include_url=False, include_input=False)
            ]
            raise InputValidationError(problems) from None
        if isinstance(checked, BaseModel):
            dumped: dict[str, Any] = checked.model_dump(mode="json")
            return dumped
        return dict(checked)

    def describe(self) -> dict[str, Any]:
        """What a waiting run shows about its wait (prompt and the schema of the input)."""
        return {"prompt": self.prompt, "input_schema": self.input_schema}


def compile_wait(
    spec: Any, models: Mapping[str, type[BaseModel]], path: str
) -> tuple[WaitPlan | None, list[Problem]]:
    """Compile a node's ``wait`` block (a :class:`~trioflow.document.WaitSpec`).

    Returns:
        The plan, or ``None`` and every problem found (each with a JSON path).
    """
    problems: list[Problem] = []
    if spec.input_schema is not None and spec.input_model is not None:
        problems.append(
            Problem("invalid_wait", path, "a wait takes input_schema or input_model, not both")
        )
        return None, problems
    kind: InputKind = "any"
    schema: dict[str, Any] | None = None
    if spec.input_model is not None:
        model = models.get(spec.input_model)
        if model is None:
            message = f"input model {spec.input_model!r} is not registered"
            problems.append(Problem("unknown_input_model", f"{path}.input_model", message))
            return None, problems
        validator = model.__pydantic_validator__
        schema, kind = model.model_json_schema(), "model"
    elif spec.input_schema is not None:
        try:
            compiled = _compile(spec.input_schema, f"{path}.input_schema")
        except SchemaProblem as exc:
            problems.append(Problem("invalid_input_schema", exc.path, exc.message))
            return None, problems
        if compiled["type"] not in ("typed-dict", "dict", "any"):
            problems.append(
                Problem(
                    "invalid_input_schema",
                    f"{path}.input_schema",
                    "the input is merged into the state: its schema must describe an object",
                )
            )
            return None, problems
        validator, schema, kind = SchemaValidator(compiled), dict(spec.input_schema), "schema"
    else:
        validator = SchemaValidator(
            core_schema.dict_schema(core_schema.str_schema(), core_schema.any_schema())
        )
    timeout_input: dict[str, Any] | None = None
    plan = WaitPlan(spec.prompt, schema, spec.timeout_s, None, validator, kind)
    if spec.on_timeout != "fail":
        try:
            timeout_input = plan.check(spec.on_timeout.input)
        except InputValidationError as exc:
            for p in exc.problems:
                where = f"{path}.on_timeout.input{p.path[1:]}"
                message = f"the default input does not fit: {p.message}"
                problems.append(Problem("invalid_timeout_input", where, message))
            return None, problems
        if spec.timeout_s is None:
            problems.append(
                Problem("invalid_wait", f"{path}.on_timeout", "on_timeout needs a timeout_s")
            )
            return None, problems
    return WaitPlan(spec.prompt, schema, spec.timeout_s, timeout_input, validator, kind), problems
