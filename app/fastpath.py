"""The two requests every job makes (submit, poll), answered from the routes' own definitions
without FastAPI's per-request routing and dependency machinery.

Per request FastAPI walks every route, solves the dependency tree and wraps the call in exit stacks:
about as much CPU as the database round trip, and the API's event loop is where submits queue.
This layer serves a chosen route with that route's own parts: its compiled path regex and
convertors (as included in the app: prefix and all), FastAPI's validation of each parameter against the route's declared fields
(`request_params_to_args`, `request_body_to_args`), the route's endpoint function, the app's
exception handlers, and the route's response. Authentication and the body limit are middleware in
front of both. Nothing about how a request is answered is written here:

- a request whose parameters do not validate is handed to FastAPI untouched (its body replayed),
  before any side effect, so every error answer comes from FastAPI;
- a route with anything this layer does not bind (another dependency, app-wide dependencies,
  cookies, security scopes, background tasks) is not served here at all: it is checked when the
  app is built, and a dependency added later to the app or the route turns this off for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fastapi
from fastapi import FastAPI
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.routing import iter_route_contexts
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.bodylimit import read_body, replay
from app.query import accepted, is_strict, unknown_error

log = logging.getLogger(__name__)

# The FastAPI internals used here (request_params_to_args, request_body_to_args, Dependant's fields)
# are those of this version; any other serves every request through FastAPI.
FASTAPI_VERSIONS = ("0.165.",)


def incompatibility(route: Any, app: FastAPI, dependency: Callable[..., Any]) -> str | None:
    """Why this layer cannot answer for `route` exactly as FastAPI would (None: it can)."""
    if not fastapi.__version__.startswith(FASTAPI_VERSIONS):
        return f"written for FastAPI {'/'.join(FASTAPI_VERSIONS)}x, this is {fastapi.__version__}"
    if app.router.dependencies or route.dependencies:
        return "the app or the route has dependencies of its own"
    d = route.dependant
    if d is None:
        return "it has no dependant"
    if d.cookie_params or d.request_param_name or d.websocket_param_name or d.http_connection_param_name:
        return "it takes cookies or the request itself"
    if d.response_param_name or d.background_tasks_param_name or d.security_scopes_param_name:
        return "it takes a response, background tasks or security scopes"
    if len(d.body_params) > 1 or (d.body_params and route._embed_body_fields):
        return "its body has several parts"
    if len(d.dependencies) != 1:
        return f"it has {len(d.dependencies)} dependencies"
    (sub,) = d.dependencies
    own_params = (
        sub.path_params or sub.query_params or sub.header_params or sub.body_params or sub.cookie_params
    )
    if sub.call is not dependency or sub.dependencies or own_params or sub.name is None:
        return f"its dependency is {getattr(sub.call, '__name__', sub.call)}, or it has parameters of its own"
    return None


@dataclass
class _Served:
    route: Any  # the route as included in the app (prefix, dependencies): FastAPI's route context
    dependency_name: str
    query_names: frozenset[str] | None  # the query parameters it takes, if it refuses others (app.query)

    def match(self, scope: Scope) -> dict[str, Any] | None:
        """The path parameters if this route takes the request (Starlette's matching, the route's regex)."""
        found = self.route.path_regex.match(scope["path"])
        if found is None or scope["method"] not in self.route.methods:
            return None
        convertors = self.route.param_convertors
        return {name: convertors[name].convert(value) for name, value in found.groupdict().items()}


def included_routes(api: FastAPI) -> list[Any]:
    """Every route as the app serves it: FastAPI 0.165 keeps included routers as contexts (prefix,
    merged dependencies, the dependant they make)."""
    routes = []
    for context in iter_route_contexts(api.router.routes):
        included = context._route_context
        routes.append(included if included is not None else context.route)
    return routes


class FastPath:
    def __init__(
        self,
        app: ASGIApp,
        api: FastAPI,
        endpoints: Sequence[Callable[..., Any]],
        dependency: Callable[[Request], Any],
    ) -> None:
        self.app = app
        self.api = api
        self.dependency = dependency
        self._endpoints = tuple(endpoints)
        self._served: list[_Served] | None = None

    def served(self) -> list[str]:
        """The paths answered here (decided on the first request: the app is complete by then)."""
        if self._served is None:
            self._served = []
            for route in included_routes(self.api):
                if getattr(route, "endpoint", None) in self._endpoints:
                    reason = incompatibility(route, self.api, self.dependency)
                    if reason is None:
                        name = route.dependant.dependencies[0].name
                        assert name is not None
                        names = accepted(route.dependant) if is_strict(route) else None
                        self._served.append(_Served(route, name, names))
                    else:
                        log.warning("%s %s is served by FastAPI only: %s", route.methods, route.path, reason)
        return [s.route.path for s in self._served]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self._served is None:
                self.served()
            assert self._served is not None
            for served in self._served:
                path_params = served.match(scope)
                if path_params is not None:
                    await self._answer(served, {**scope, "path_params": path_params}, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _answer(self, served: _Served, scope: Scope, receive: Receive, send: Send) -> None:
        route, d = served.route, served.route.dependant
        body: bytes | None = None
        values: dict[str, Any] = {}
        errors: list[Any] = []
        query = QueryParams(scope["query_string"])
        for fields, received in (
            (d.path_params, scope["path_params"]),
            (d.query_params, query),
            (d.header_params, Headers(scope=scope)),
        ):
            if fields:
                found, wrong = request_params_to_args(fields, received)
                values.update(found)
                errors += wrong
        names = served.query_names
        if names is not None and scope["query_string"] and unknown_error(names, query.multi_items()):
            errors.append("unknown query parameter")
        if d.body_params:
            body = await read_body(receive)
            if body is None:
                return  # the client went away
            parsed = _json(scope, body)
            if parsed is _NOT_JSON:
                errors.append("not JSON")
            elif not errors:
                found, wrong = await request_body_to_args(d.body_params, parsed, embed_body_fields=False)
                values.update(found)
                errors += wrong
        if errors:  # FastAPI gives the answer (the same validation, its error rendering)
            await self.app(scope, replay(body, receive) if body is not None else receive, send)
            return
        request = Request(scope, receive)
        try:
            values[served.dependency_name] = await self.dependency(request)
            response = await route.endpoint(**values)
            if not isinstance(response, Response):
                raise TypeError(f"{route.path}: the fast path needs the endpoint to return a Response")
        except Exception as exc:
            handler = _handler(self.api, exc)
            if handler is None:
                raise  # the app's last-resort middleware answers 500
            response = await handler(request, exc)
        await response(scope, receive, send)


_NOT_JSON = object()


def _json(scope: Scope, body: bytes) -> Any:
    """The body as FastAPI reads it: JSON (or nothing); _NOT_JSON lets FastAPI say what is wrong."""
    if not body:
        return None
    content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    if content_type.split(b";")[0].strip().lower() != b"application/json":
        return _NOT_JSON
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _handler(api: FastAPI, exc: Exception) -> Any:
    for cls in type(exc).__mro__:
        if cls in api.exception_handlers:
            return api.exception_handlers[cls]
    return None
