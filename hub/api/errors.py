"""The API's error format and the middleware that guarantees it.

Every error leaves the hub as ``{"error": {"code", "message", "details"}}`` with a fitting HTTP status.
``ApiError`` is the root exception of the API layer; handlers raise it (or a domain exception that
``error_middleware`` translates: auth errors, validation errors, device errors, aiohttp's own 404/405/413).
Anything unexpected is logged with its traceback and answered as a 500 in the same format — the fuzz test
makes sure that never happens.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from devices.errors import (
    AuthenticationFailed,
    CommandRejected,
    DeviceError,
    DeviceUnreachable,
    NotSupported,
    ProtocolError,
)
from hub.auth import AuthError, RateLimited

_LOGGER = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API reports to its caller."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} {ident!r} not found", {"id": ident})


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "details": details}}, status=status, headers=headers
    )


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def device_error_to_api(err: DeviceError) -> ApiError:
    """Translate a driver failure into the API's terms."""
    if isinstance(err, CommandRejected):
        return ApiError(409, "command_rejected", f"the module refused the command: {err}")
    if isinstance(err, NotSupported):
        return ApiError(422, "not_supported", str(err))
    if isinstance(err, DeviceUnreachable):
        # The hub is fine and so was the request; the module is not there right now: a state conflict.
        return ApiError(409, "device_unreachable", f"the module did not answer: {err}")
    if isinstance(err, ProtocolError):
        return ApiError(502, "protocol_error", f"the module answered badly: {err}")
    if isinstance(err, AuthenticationFailed):
        return ApiError(409, "device_auth_failed", f"the module refused the hub's credential: {err}")
    return ApiError(409, "device_error", str(err))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err.status, err.code, err.message, err.details, err.headers)
    except AuthError as err:
        status = err.http_status
        if status >= 500:
            _LOGGER.error("auth storage failed: %s", err)
        headers: dict[str, str] = {}
        if isinstance(err, RateLimited):
            headers["Retry-After"] = err.retry_after_header
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error_response(status, err.code, str(err), err.details or None, headers)
    except DeviceError as err:
        api = device_error_to_api(err)
        return error_response(api.status, api.code, api.message)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        code = _HTTP_CODES.get(err.status, "http_error")
        details: dict[str, Any] | None = None
        if isinstance(err, web.HTTPMethodNotAllowed):
            details = {"allowed": sorted(err.allowed_methods)}
            return error_response(
                err.status, code, err.reason, details, {"Allow": ",".join(sorted(err.allowed_methods))}
            )
        return error_response(err.status, code, err.reason, details)
    except Exception:
        _LOGGER.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the hub's log")
