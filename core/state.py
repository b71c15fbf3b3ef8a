"""State models and how node updates are applied to them.

The engine keeps each run's state as a validated model instance and as its
JSON-safe dump (what conditions see and what stores persist). A node's update
is merged into the dump and validated again, so an update that breaks the
model fails the run with the node and field named.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import StateValidationError


class JsonState(BaseModel):
    """The default state model: any JSON object; keys are readable as attributes."""

    model_config = ConfigDict(extra="allow")

    def get(self, key: str, default: Any = None) -> Any:
        """Read a key like ``dict.get``."""
        extra = self.__pydantic_extra__ or {}
        return extra.get(key, default)


#: The first integer too large for JSON as read here: Python and pydantic-core
#: refuse to parse integers of more than 4,300 digits.
_TOO_BIG_INT = 10**4300


def json_problem(value: Any, path: str = "") -> tuple[str, str] | None:
    """Where ``value`` stops being plain JSON that reads back as itself, and why.

    Plain JSON here: objects with string keys, arrays (lists or tuples),
    strings, booleans, ``None``, integers of at most 4,300 digits and finite
    floats. Sets, bytes, NaN, infinities and other objects are not: a store
    would keep something other than the value, or nothing it can read back.

    Returns:
        ``(path, reason)`` of the first problem (``path`` like ``a.b[2]``), or ``None``.
    """
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str) or item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            if -_TOO_BIG_INT < item < _TOO_BIG_INT:
                continue
            return where, "integer has more than 4300 digits; JSON readers refuse it"
        if isinstance(item, float):
            if math.isfinite(item):
                continue
            return where, f"{item!r} is not JSON (NaN and infinities are not numbers in JSON)"
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return where, f"key {key!r} is not a string; JSON object keys are strings"
                stack.append((f"{where}.{key}" if where else key, child))
            continue
        if isinstance(item, list | tuple):
            stack.extend((f"{where}[{i}]", child) for i, child in enumerate(item))
            continue
        return where, f"a {type(item).__name__} is not a JSON value"
    return None


def _json_error(problem: tuple[str, str], node: str | None) -> StateValidationError:
    field, reason = problem
    where = f"node {node!r} produced an invalid state" if node else "invalid initial state"
    return StateValidationError(
        f"{where}: {field or '<root>'}: {reason}",
        node=node,
        errors=[{"field": field, "message": reason, "type": "json_invalid"}],
    )


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


class StateAdapter:
    """Validates and updates states of one model."""

    __slots__ = ("model", "permissive")

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model
        #: The default model keeps any value it is given (as an extra field),
        #: so values must be checked as given; a typed model's fields are
        #: checked as it dumps them.
        self.permissive = issubclass(model, JsonState)

    def initial(self, data: Any) -> tuple[BaseModel, dict[str, Any]]:
        """Validate an initial state.

        Raises:
            StateValidationError: ``data`` is not an object or does not fit the model.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise StateValidationError(
                "initial state must be a JSON object",
                node=None,
                errors=[{"field": "", "message": "expected an object", "type": "type_error"}],
            )
        data = dict(data)
        if self.permissive:
            problem = json_problem(data)
            if problem is not None:
                raise _json_error(problem, None)
        model, dumped = self._validate(data, node=None)
        if not self.permissive:
            problem = json_problem(dumped)
            if problem is not None:
                raise _json_error(problem, None)
        return model, dumped

    def apply(
        self, current: dict[str, Any], update: Any, node: str
    ) -> tuple[BaseModel, dict[str, Any]] | None:
        """Apply a node's return value; ``None`` means no change.

        Raises:
            StateValidationError: the update is of the wrong type or breaks the model.
        """
        if update is None:
            return None
        if isinstance(update, BaseModel):
            if not isinstance(update, self.model):
                raise StateValidationError(
                    f"node {node!r} returned a {type(update).__name__}, "
                    f"expected {self.model.__name__}",
                    node=node,
                    errors=[],
                )
            merged = update.model_dump(mode="python")
            changed: Mapping[str, Any] = merged
        elif isinstance(update, Mapping):
            merged = {**current, **update}
            changed = update
        else:
            raise StateValidationError(
                f"node {node!r} returned {type(update).__name__}; a node returns None, "
                "a mapping of updates or a state model",
                node=node,
                errors=[],
            )
        if self.permissive:
            self._check_json(changed, node)
        model, dumped = self._validate(merged, node=node)
        if not self.permissive:
            # A typed model dumps sets as lists (and reads them back), but a
            # float field may hold NaN and an int field any size.
            self._check_json({k: dumped.get(k) for k in changed}, node)
        return model, dumped

    @staticmethod
    def _check_json(values: Mapping[str, Any], node: str) -> None:
        for key, value in values.items():
            problem = json_problem(value, str(key))
            if problem is not None:
                raise _json_error(problem, node)

    def _validate(self, data: dict[str, Any], node: str | None) -> tuple[BaseModel, dict[str, Any]]:
        try:
            model = self.model.model_validate(data)
            dumped = model.model_dump(mode="json")
        except ValidationError as exc:
            where = f"node {node!r} produced an invalid state" if node else "invalid initial state"
            errors = _errors(exc)
            fields = ", ".join(e["field"] or "<root>" for e in errors)
            raise StateValidationError(f"{where}: {fields}", node=node, errors=errors) from None
        except (ValueError, TypeError) as exc:  # e.g. non-JSON values in a permissive model
            where = f"node {node!r} produced an invalid state" if node else "invalid initial state"
            raise StateValidationError(
                f"{where}: {exc}",
                node=node,
                errors=[{"field": "", "message": str(exc), "type": "serialization"}],
            ) from None
        return model, dumped

    def load(self, dumped: dict[str, Any]) -> BaseModel:
        """Rebuild the model from a stored dump (used when a run resumes)."""
        return self.model.model_validate(dumped)
