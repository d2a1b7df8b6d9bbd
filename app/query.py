"""Query parameters a route does not take are refused (422), as unknown body fields are.

A misspelt filter (`?statsu=failed`) or wait (`?wiat=30`) would otherwise be ignored: a listing of
everything, or a poll answered at once. Routes under /v1 keep OpenAI's leniency (its clients may add
their own, e.g. Azure's `api-version`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


def accepted(dependant: Dependant) -> frozenset[str]:
    """The query parameter names a route takes (aliases as sent), its dependencies' included."""
    names: set[str] = set()
    stack = [dependant]
    while stack:
        current = stack.pop()
        names.update(field.alias for field in current.query_params)
        stack.extend(current.dependencies)
    return frozenset(names)


def unknown_error(
    names: frozenset[str], received: Iterable[tuple[str, str]]
) -> RequestValidationError | None:
    """The error for the received parameters a route does not take (None: it takes them all)."""
    unknown = [(name, value) for name, value in received if name not in names]
    if not unknown:
        return None
    takes = ", ".join(sorted(names)) or "none"
    message = f"unknown query parameter (this path takes: {takes})"
    return RequestValidationError(
        [
            {"type": "extra_forbidden", "loc": ("query", name), "msg": message, "input": value}
            for name, value in unknown
        ]
    )


class StrictQueryRoute(APIRoute):
    """A route whose requests carrying a query parameter it does not take are refused (422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        names = accepted(self.dependant)

        async def strict(request: Request) -> Response:
            error = unknown_error(names, request.query_params.multi_items())
            if error is not None:
                raise error
            return await handler(request)

        return strict


def is_strict(route: Any) -> bool:
    """Whether a route (or FastAPI's context of an included one) refuses unknown query parameters."""
    return isinstance(getattr(route, "original_route", route), StrictQueryRoute)
