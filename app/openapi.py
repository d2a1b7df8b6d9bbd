"""The API description's errors as the app answers them: each surface's error shape (app.errors
renders `{"error", "detail"}`, and OpenAI's object under /v1), and the statuses an operation meets
outside its route: the Authentication middleware's 401 and 503, the body limit's 413 and 415 and
the tenant filter's 403."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from app.auth import PUBLIC_PATHS
from app.errors import DATABASE_DOWN, is_openai_path
from app.schemas import ErrorBody
from app.schemas_openai import OpenAIError

_REF = "#/components/schemas/"


class ValidationProblem(BaseModel):
    """One field of a request that fails validation (app.errors.describe_validation)."""

    field: str = Field(description="Where: `body.content`, `query.limit`, `path.result_id`…")
    message: str
    type: str = Field(description="The check that failed: `missing`, `uuid_parsing`, `less_than_equal`…")


class InvalidRequest(BaseModel):
    """A 422 outside /v1 (under /v1 an invalid request is OpenAI's 400)."""

    error: str = Field(description="What is wrong, in one line")
    detail: list[ValidationProblem] | dict[str, Any] | None = Field(
        description='The fields that fail validation; an object (e.g. `{"field": ...}`) when a check '
        "of the operation's own refused the request; null for a JSON body nested too deeply to read"
    )


BEARER_KEYS = {
    "apiKey": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer llmq_…`"}
}
# The query parameter Principal.listing_tenant refuses (403) to a user key naming another tenant.
TENANT_FILTER = "tenant"
# FastAPI's defaults for its own 422, replaced by what app.errors answers.
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")
_ERROR_SHAPES = {*_FASTAPI_VALIDATION, ErrorBody.__name__, OpenAIError.__name__}
_GENERIC_422 = {"Validation Error", "Unprocessable Entity", "Unprocessable Content"}

UNAUTHENTICATED = {
    "description": "Missing, malformed, unknown or revoked API key",
    "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
}


def describe_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document of the app (`schema`, changed in place) with the errors the app answers."""
    components = schema.setdefault("components", {})
    components["securitySchemes"] = BEARER_KEYS
    shapes = components.setdefault("schemas", {})
    for model in (ErrorBody, OpenAIError, InvalidRequest):
        _add_component(shapes, model)
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            _describe_operation(path, operation)
    for name in _FASTAPI_VALIDATION:  # HTTPValidationError first: it is what refers to ValidationError
        if f'"{_REF}{name}"' not in json.dumps(schema):
            shapes.pop(name, None)
    return schema


def _describe_operation(path: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    openai = is_openai_path(path)
    if openai:
        responses.pop("422", None)  # render_error answers every invalid request 400 there
    else:  # app.query: a query parameter the route does not take
        responses.setdefault("422", {"description": "Validation Error"})
    if path not in PUBLIC_PATHS:  # the paths the Authentication middleware lets through
        operation["security"] = [{"apiKey": []}]
        responses["401"] = dict(UNAUTHENTICATED)
        # The middleware's key lookup reads the database (a route's statements too).
        responses.setdefault("503", {"description": DATABASE_DOWN.capitalize()})
    parameters = operation.get("parameters", ())
    if any(p.get("in") == "query" and p.get("name") == TENANT_FILTER for p in parameters):
        responses.setdefault("403", {"description": "The `tenant` filter needs an admin key"})
    if "requestBody" in operation:
        responses.setdefault("413", {"description": "The body is over the size limit"})
        responses.setdefault("415", {"description": "The body is labelled as something else than JSON"})
    for status, response in responses.items():
        if not status.isdigit() or int(status) < 400 or not _is_error(response):
            continue
        shape = OpenAIError if openai else InvalidRequest if status == "422" else ErrorBody
        response["content"] = {"application/json": {"schema": {"$ref": _REF + shape.__name__}}}
        if status == "422" and response.get("description") in _GENERIC_422:
            response["description"] = "Invalid request: `detail` says which fields and why"
    operation["responses"] = dict(sorted(responses.items()))


def _is_error(response: dict[str, Any]) -> bool:
    """An answer of app.errors' renderers (not one a route makes itself, e.g. readiness's 503)."""
    content = response.get("content")
    if content is None:
        return True
    ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
    return isinstance(ref, str) and ref.removeprefix(_REF) in _ERROR_SHAPES


def _add_component(shapes: dict[str, Any], model: type[BaseModel]) -> None:
    generated = model.model_json_schema(ref_template=_REF + "{model}")
    for name, definition in generated.pop("$defs", {}).items():
        shapes.setdefault(name, definition)
    shapes.setdefault(model.__name__, generated)
