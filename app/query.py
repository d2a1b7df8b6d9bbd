"""Query parameters a route does not take are refused (422), as unknown body fields are, and so is a
parameter that takes one value sent more than once.

A misspelt filter (`?statsu=failed`) or wait (`?wiat=30`) would otherwise be ignored: a listing of
everything, or a poll answered at once; of `?limit=1&limit=3` FastAPI would keep one value silently.
List-valued parameters (`?status=failed&status=cancelled`) stay repeatable. Routes under /v1 keep
OpenAI's leniency (its clients may add their own, e.g. Azure's `api-version`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi._compat import field_annotation_is_sequence
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class Accepted(frozenset[str]):
    """The query parameter names a route takes; `single`: those that take one value."""

    single: frozenset[str]

    def __new__(cls, names: Iterable[str], single: Iterable[str] = ()) -> Accepted:
        accepted = super().__new__(cls, names)
        accepted.single = frozenset(single)
        return accepted


def accepted(dependant: Dependant) -> Accepted:
    """The query parameter names a route takes (aliases as sent), its dependencies' included."""
    names: set[str] = set()
    lists: set[str] = set()
    stack = [dependant]
    while stack:
        current = stack.pop()
        for field in current.query_params:
            names.add(field.alias)
            if field_annotation_is_sequence(field.field_info.annotation):  # FastAPI reads it as a list
                lists.add(field.alias)
        stack.extend(current.dependencies)
    return Accepted(names, names - lists)


def unknown_error(
    names: frozenset[str], received: Iterable[tuple[str, str]]
) -> RequestValidationError | None:
    """The error for the received parameters a route does not take, or that take one value and came
    more than once (None: nothing to refuse)."""
    received = list(received)
    unknown = [(name, value) for name, value in received if name not in names]
    single: frozenset[str] = getattr(names, "single", frozenset())
    sent = [name for name, _ in received if name in single]
    repeated = [
        (name, [value for other, value in received if other == name])
        for name in dict.fromkeys(sent)
        if sent.count(name) > 1
    ]
    if not unknown and not repeated:
        return None
    takes = ", ".join(sorted(names)) or "none"
    message = f"unknown query parameter (this path takes: {takes})"
    errors: list[dict[str, Any]] = [
        {"type": "extra_forbidden", "loc": ("query", name), "msg": message, "input": value}
        for name, value in unknown
    ]
    errors += [
        {
            "type": "repeated_parameter",
            "loc": ("query", name),
            "msg": "takes one value, and was sent more than once: send it once",
            "input": values,
        }
        for name, values in repeated
    ]
    return RequestValidationError(errors)


class StrictQueryRoute(APIRoute):
    """A route whose requests carrying a query parameter it does not take, or one of its one-value
    parameters twice, are refused (422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        names = accepted(self.dependant)

        async def strict(request: Request) -> Response:
            if request.scope["query_string"]:  # most requests have none: nothing to look at
                error = unknown_error(names, request.query_params.multi_items())
                if error is not None:
                    raise error
            return await handler(request)

        return strict


def is_strict(route: Any) -> bool:
    """Whether a route (or FastAPI's context of an included one) refuses unknown query parameters."""
    return isinstance(getattr(route, "original_route", route), StrictQueryRoute)
