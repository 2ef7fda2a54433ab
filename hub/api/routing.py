"""Declarative routes: one place that says a route's method, path, role, schemas and docs.

Each handler is registered with ``ApiRouter.route``, naming the pydantic models for its query string, its JSON
body and its response, and the role it needs.  The router validates the request against those models before
the handler runs (so every body is schema-checked and bad input gets a 400/422 in the API's error format),
checks the bearer token's role, and serialises the response model.  ``ApiRouter.openapi()`` builds the
OpenAPI 3.1 document from the very same models, so the document and the validation cannot drift apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from hub.api.errors import ApiError
from hub.auth import Role, TokenInfo, require

Q = TypeVar("Q", bound=BaseModel)
B = TypeVar("B")

MAX_BODY_BYTES = 64 * 1024


@dataclass(slots=True)
class Call(Generic[Q, B]):
    """What a handler receives: the request, the validated query and body, and the caller's token."""

    request: web.Request
    query: Q
    body: B
    token: TokenInfo | None
    path: dict[str, str]


class Empty(BaseModel):
    """No parameters."""

    model_config = {"extra": "forbid"}


HandlerFn = Callable[[Call[Any, Any]], Awaitable[BaseModel | web.StreamResponse]]


@dataclass(slots=True)
class Operation:
    method: str
    path: str
    handler: HandlerFn
    summary: str
    description: str
    tag: str
    role: Role | None
    query: type[BaseModel]
    body: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    stream: str | None  # content type of a streamed response, e.g. text/event-stream
    errors: tuple[int, ...] = field(default_factory=tuple)
    also: tuple[int, ...] = field(default_factory=tuple)  # other success statuses with the same body
    # OpenAPI ``requestBody`` of an operation that reads its own body (e.g. a multipart upload)
    request_body: dict[str, Any] | None = None


_PATH_PARAM = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


def _validation_details(err: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in err.errors(include_url=False, include_context=False, include_input=False)
    ]


class ApiRouter:
    """Collects operations, turns them into aiohttp routes and into an OpenAPI document."""

    def __init__(self, *, title: str, version: str, description: str = "") -> None:
        self.title = title
        self.version = version
        self.description = description
        self.operations: list[Operation] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        tag: str,
        role: Role | None = Role.VIEWER,
        query: type[BaseModel] = Empty,
        body: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        status: int = 200,
        stream: str | None = None,
        errors: tuple[int, ...] = (),
        also: tuple[int, ...] = (),
        request_body: dict[str, Any] | None = None,
    ) -> Callable[[HandlerFn], HandlerFn]:
        def decorator(fn: HandlerFn) -> HandlerFn:
            self.operations.append(
                Operation(
                    method=method.upper(),
                    path=path,
                    handler=fn,
                    summary=summary,
                    description=(fn.__doc__ or "").strip(),
                    tag=tag,
                    role=role,
                    query=query,
                    body=body,
                    response=response,
                    status=status,
                    stream=stream,
                    errors=errors,
                    also=also,
                    request_body=request_body,
                )
            )
            return fn

        return decorator

    # ----------------------------------------------------------------------------------------------- serving

    def add_routes(self, app: web.Application) -> None:
        for op in self.operations:
            app.router.add_route(op.method, op.path, self._wrap(op))

    def _wrap(self, op: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            token = await require(request, op.role) if op.role is not None else None
            try:
                query = op.query.model_validate(dict(request.query))
            except ValidationError as err:
                raise ApiError(
                    400,
                    "invalid_query",
                    "the query string does not match the schema",
                    _validation_details(err),
                ) from err
            body: BaseModel | None = None
            if op.body is not None:
                try:
                    # Strict: JSON types must match the schema (no "1" for 1, no 0 for false).
                    body = op.body.model_validate(await _read_json(request), strict=True)
                except ValidationError as err:
                    raise ApiError(
                        422,
                        "invalid_body",
                        "the request body does not match the schema",
                        _validation_details(err),
                    ) from err
            elif (
                op.request_body is None
                and request.can_read_body
                and request.method in ("POST", "PUT", "PATCH")
            ):
                # Nothing is expected: still refuse oversized input cheaply.
                await _read_json(request, allow_empty=True)
            call: Call[Any, Any] = Call(request, query, body, token, dict(request.match_info))
            result = await op.handler(call)
            if isinstance(result, web.StreamResponse):
                return result
            return web.Response(
                body=result.model_dump_json(by_alias=True).encode(),
                status=op.status,
                content_type="application/json",
            )

        return handle

    # ----------------------------------------------------------------------------------------------- OpenAPI

    def openapi(self) -> dict[str, Any]:
        models: set[type[BaseModel]] = {ErrorBody}
        for op in self.operations:
            for m in (op.body, op.response):
                if m is not None:
                    models.add(m)
        # One schema per model: our models validate and serialise the same way.
        refs, schema = models_json_schema(
            [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.get("$defs", {})
        paths: dict[str, dict[str, Any]] = {}
        for op in self.operations:
            item = paths.setdefault(op.path, {})
            params: list[dict[str, Any]] = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                for name in _PATH_PARAM.findall(op.path)
            ]
            qschema = op.query.model_json_schema()
            required = set(qschema.get("required", []))
            for name, raw_prop in qschema.get("properties", {}).items():
                prop = dict(raw_prop)
                desc = prop.pop("description", None)
                prop.pop("title", None)
                p: dict[str, Any] = {
                    "name": name,
                    "in": "query",
                    "required": name in required,
                    "schema": prop,
                }
                if desc:
                    p["description"] = desc
                params.append(p)
            responses: dict[str, Any] = {}
            if op.stream:
                responses[str(op.status)] = {
                    "description": "stream",
                    "content": {op.stream: {"schema": {"type": "string"}}},
                }
            elif op.response is not None:
                for code in (op.status, *op.also):
                    responses[str(code)] = {
                        "description": "success",
                        "content": {"application/json": {"schema": refs[(op.response, "validation")]}},
                    }
            else:
                responses[str(op.status)] = {"description": "success"}
            error_ref = {"content": {"application/json": {"schema": refs[(ErrorBody, "validation")]}}}
            codes = {400, *op.errors}
            if op.body is not None or op.request_body is not None:
                codes |= {413, 415, 422}
            if op.role is not None:
                codes |= {401, 403}
            for code in sorted(codes):
                responses[str(code)] = {"description": _ERROR_TEXT.get(code, "error"), **error_ref}
            operation: dict[str, Any] = {
                "operationId": f"{op.method.lower()}_{_op_name(op.path)}",
                "summary": op.summary,
                "tags": [op.tag],
                "parameters": params,
                "responses": responses,
            }
            if op.description:
                operation["description"] = op.description
            if op.role is not None:
                operation["security"] = [{"bearer": []}]
                operation["x-required-role"] = op.role.value
            if op.body is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
                }
            if op.request_body is not None:
                operation["requestBody"] = op.request_body
            item[op.method.lower()] = operation
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version, "description": self.description},
            "paths": paths,
            "components": {
                "schemas": components,
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }


_ERROR_TEXT = {
    400: "malformed request",
    401: "missing or invalid bearer token",
    403: "the token's role may not do this",
    404: "not found",
    409: "conflict with the current state",
    413: "request body too large",
    415: "request body is not JSON",
    422: "request body fails validation",
    429: "too many attempts",
    507: "not enough storage for the upload",
    502: "the module answered badly",
    504: "the module did not answer",
}


def _op_name(path: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", path).strip("_") or "root"


async def _read_json(request: web.Request, *, allow_empty: bool = False) -> Any:
    """Read a JSON body with a size cap; translate every failure into an ApiError."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    raw = bytearray()
    async for chunk in request.content.iter_chunked(16384):
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, "payload_too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        if allow_empty:
            return None
        raise ApiError(400, "invalid_json", "a JSON request body is required")
    if allow_empty:
        return None
    ctype = request.content_type
    if ctype not in ("application/json", "application/octet-stream", "") and not ctype.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", f"send application/json, not {ctype}")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {err}") from err


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    """The one error format of the API."""

    error: ErrorDetail
