"""``/openapi.json``: an OpenAPI 3.1 document built from the routes table and the wire schemas."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaValue, models_json_schema

import trioflow

from . import schemas
from .routes import ALL_OPERATIONS, WEBSOCKET_PATH, Body, Operation

_REF = "#/components/schemas/{model}"

_DESCRIPTION = f"""\
trioflow runs JSON-defined workflow graphs. Errors are always
`{{"error": {{"code", "message", "details"}}}}`.

WebSocket `{WEBSOCKET_PATH}?after=SEQ` sends text frames: `LogMessage` for each
entry (replay, then live), one `StatusMessage`, then closes with 1000. An
unknown run gets an `ErrorMessage` and close code 4404 (4000 + HTTP status);
a server shutdown closes with 1001.
"""

Mode = Literal["validation", "serialization"]


def _models() -> list[tuple[type[BaseModel], Mode]]:
    pairs: list[tuple[type[BaseModel], Mode]] = []
    for op in ALL_OPERATIONS:
        if op.body is not None:
            pairs.append((op.body, "validation"))
        for _, body in op.responses.values():
            if isinstance(body, type):
                pairs.append((body, _response_mode(body)))
    for message in (schemas.LogMessage, schemas.StatusMessage, schemas.ErrorMessage):
        pairs.append((message, "serialization"))
    return list(dict.fromkeys(pairs))


def _response_mode(model: type[BaseModel]) -> Mode:
    # A response that is an input document (GET /graph/{id}) is described as
    # that input; everything else as it is serialised.
    return "validation" if model is trioflow.GraphDocument else "serialization"


Refs = dict[tuple[type[BaseModel] | Any, Mode], JsonSchemaValue]


def _schema_of(body: Body, refs: Refs, mode: Mode | None = None) -> Any:
    if isinstance(body, type):
        return refs[(body, mode or _response_mode(body))]
    return body


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a string: drop the ``null`` branch of an optional field."""
    prop = dict(prop)
    options = [o for o in prop.pop("anyOf", ()) if o != {"type": "null"}]
    if len(options) == 1:
        prop.update(options[0])
    elif options:
        prop["anyOf"] = options
    if prop.get("default", 0) is None:
        del prop["default"]
    return prop


def _parameters(op: Operation) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in re.findall(r"{(\w+)}", op.path)
    ]
    if op.query is not None:
        schema = op.query.model_json_schema(mode="validation")
        required = set(schema.get("required", ()))
        for name, prop in schema["properties"].items():
            prop = _without_null(prop)
            description = prop.pop("description", None)
            prop.pop("title", None)
            param: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": prop,
            }
            if description:
                param["description"] = description
            params.append(param)
    for name, (description, schema) in op.headers.items():
        params.append(
            {
                "name": name,
                "in": "header",
                "required": False,
                "description": description,
                "schema": schema,
            }
        )
    return params


def build_openapi() -> dict[str, Any]:
    """The OpenAPI document of every operation in :data:`web.routes.ALL_OPERATIONS`."""
    refs, top = models_json_schema(_models(), ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for op in ALL_OPERATIONS:
        responses: dict[str, Any] = {}
        declared = dict(op.responses)
        if op.access != "public":
            error = schemas.ErrorResponse
            declared.setdefault(401, ("No API token, or an unknown, revoked or expired one", error))
            declared.setdefault(429, ("This token is over its rate (Retry-After)", error))
        for status, (description, body) in sorted(declared.items()):
            media = op.media_type if status < 300 else "application/json"
            responses[str(status)] = {"description": description}
            if body is not None:  # 204 and 304 carry no content at all
                responses[str(status)]["content"] = {media: {"schema": _schema_of(body, refs)}}
        operation: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": [op.tag],
            "responses": responses,
            # {} too: a server on loopback with access control off (or in
            # auto mode, before a token exists) takes requests without one.
            "security": [] if op.access == "public" else [{"bearer": []}, {}],
            "x-trioflow-access": op.access,
        }
        params = _parameters(op)
        if params:
            operation["parameters"] = params
        if op.body is not None:
            media_entry: dict[str, Any] = {"schema": _schema_of(op.body, refs, "validation")}
            if op.body_example is not None:
                media_entry["example"] = op.body_example
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": media_entry},
            }
        paths.setdefault(op.path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "trioflow", "version": trioflow.__version__, "description": _DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token, tf_<id>_<secret> (trioflow token create)",
                }
            },
        },
    }


def openapi_bytes() -> bytes:
    return json.dumps(build_openapi(), separators=(",", ":")).encode()
