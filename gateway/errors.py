"""Errors the gateway raises, and the one place that turns them (and validation errors) into
OpenAI-shaped responses: `{"error": {"message", "type", "param", "code"}}`. Routes never build
error JSON themselves."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException


class GatewayError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.headers = message, param, headers or {}


class InvalidRequest(GatewayError):
    status_code, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthenticated(GatewayError):
    status_code, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(GatewayError):
    status_code, type, code = 403, "permission_error", "insufficient_role"


class ModelNotFound(GatewayError):
    status_code, type, code = 404, "invalid_request_error", "model_not_found"


class RateLimited(GatewayError):
    status_code, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s + 0.999)))})


class UpstreamUnavailable(GatewayError):
    status_code, type, code = 503, "service_unavailable", "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status_code, type, code = 504, "timeout", "upstream_timeout"


class UpstreamError(GatewayError):
    """vLLM answered with an error: its status and message pass through to the client."""

    def __init__(self, status_code: int, message: str, type_: str = "invalid_request_error", param=None):
        super().__init__(message, param)
        self.status_code, self.type, self.code = status_code, type_, None


log = logging.getLogger("tunegate.gateway")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: GatewayError) -> JSONResponse:
    """A `GatewayError` as OpenAI's error JSON, with its status and headers (also used outside the app,
    by the `BodyLimit` middleware)."""
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=exc.headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_down(_: Request, exc: Exception) -> JSONResponse:
        # the database is unreachable (stopped, restarting, network): a clear 503, not a bare 500
        return JSONResponse(
            error_body("the database is unavailable, retry soon", "service_unavailable", code="database_unavailable"),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"`{param}`: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug of ours still answers in OpenAI's shape (never a plain-text 500); the traceback goes
        # to the log with the route only, never the request body (it may hold personal data).
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal error in the gateway", "server_error", code="internal_error"), 500)
