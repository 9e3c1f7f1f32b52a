"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Owns: `APIError` (what a handler raises: status, message, the parameter at fault, extra
headers such as Retry-After), the JSON body, and turning FastAPI's request-validation errors
into 400s that name the field.
Does not know: routes or the engine.
"""
from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered to the client; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


async def api_error_handler(_request, exc: APIError) -> JSONResponse:
    return exc.response()


async def validation_error_handler(_request, exc: RequestValidationError) -> JSONResponse:
    """The first validation error as a 400: `param` is the top-level field, the message gives the
    full path (`messages.0.role: Field required`)."""
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    where = f"{'.'.join(loc)}: " if loc else ""
    return APIError(400, f"{where}{err.get('msg', 'invalid value')}", loc[0] if loc else None).response()
