"""HTTP errors in each API's own body shape.

Owns: the `APIError` exception the handlers raise, and its rendering as an OpenAI error
(`{"error": {"message", "type", "param", "code"}}`) or an Anthropic error
(`{"type": "error", "error": {"type", "message"}}`). Which shape a response gets depends on the
path (Anthropic: `/v1/messages...` and `/anthropic/...`; everything else OpenAI). A 500 never
carries a traceback: the detail goes to the log with an id that the body repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse

OPENAI, ANTHROPIC = "openai", "anthropic"

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def api_of_path(path: str) -> str:
    if path.startswith("/anthropic/") or path.startswith("/v1/messages"):
        return ANTHROPIC
    return OPENAI


def error_body(api: str, err: APIError) -> dict:
    if api == ANTHROPIC:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(err.status, "api_error"),
                                           "message": err.message}}
    return {"error": {"message": err.message, "type": _OPENAI_TYPES.get(err.status, "server_error"),
                      "param": err.param, "code": err.code}}


def error_response(api: str, err: APIError) -> JSONResponse:
    headers = {"retry-after": "1"} if err.status in (429, 503) else None
    return JSONResponse(error_body(api, err), status_code=err.status, headers=headers)
