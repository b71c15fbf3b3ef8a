"""State models and how node updates are applied to them.

The engine keeps each run's state as a validated model instance and as its
JSON-safe dump (what conditions see and what stores persist). A node's update
is merged into the dump and validated again, so an update that breaks the
model fails the run with the node and field named.
"""

from __future__ import annotations

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


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


class StateAdapter:
    """Validates and updates states of one model."""

    __slots__ = ("model",)

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model

    def initial(self, data: Any) -> tuple[BaseModel, dict[str, Any]]:
        """Validate an initial state.

        Raises:
            StateValidationError: ``data`` is not an object or does not fit the model.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise StateValidationError(
                "initial state must be a JSON object", node=None,
                errors=[{"field": "", "message": "expected an object", "type": "type_error"}],
            )  # fmt: skip
        return self._validate(dict(data), node=None)

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
                    node=node, errors=[],
                )  # fmt: skip
            merged = update.model_dump(mode="python")
        elif isinstance(update, Mapping):
            merged = {**current, **update}
        else:
            raise StateValidationError(
                f"node {node!r} returned {type(update).__name__}; a node returns None, "
                "a mapping of updates or a state model",
                node=node, errors=[],
            )  # fmt: skip
        return self._validate(merged, node=node)

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
                f"{where}: {exc}", node=node,
                errors=[{"field": "", "message": str(exc), "type": "serialization"}],
            ) from None  # fmt: skip
        return model, dumped

    def load(self, dumped: dict[str, Any]) -> BaseModel:
        """Rebuild the model from a stored dump (used when a run resumes)."""
        return self.model.model_validate(dumped)
