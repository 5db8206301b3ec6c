"""What every endpoint of ``peftlab serve`` shares: reading a JSON body within limits, the API key, and errors.

Bodies are read here, not by FastAPI, so that every bad body gets the same answer: over ``max_body_bytes`` →
413 (refused from its ``Content-Length`` before reading, or as soon as the bytes read pass the limit); not UTF-8,
not JSON, ``NaN`` / ``Infinity``, a missing or mistyped field, an empty text or one with a lone surrogate → 422
(400 on the OpenAI endpoints, as OpenAI answers). Errors are :class:`ApiError`; the native endpoints answer
``{"detail": ...}``, the ``/v1/`` ones OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class ApiError(Exception):
    """An HTTP error answer: status, message, and (for OpenAI's shape) the parameter at fault and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.detail = message if detail is None else detail

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_error"}.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self, openai: bool) -> dict[str, Any]:
        if openai:
            return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return {"detail": self.detail}


def check_text(value: str, what: str, allow_empty: bool = False) -> str:
    """``value`` if it is valid Unicode (no lone surrogate, which no tokenizer can encode) and, unless
    ``allow_empty``, not empty."""
    if not value and not allow_empty:
        raise ValueError(f"{what} is empty; give some text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} holds a lone surrogate {value[err.start]!r} at character {err.start}, which "
                         "is not text; send valid Unicode") from None
    return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


async def read_body(request: Any, model: type[Model], max_bytes: int, status: int = 422) -> Model:
    """The request's JSON body as ``model``, or :class:`ApiError` (413 if too large, else ``status``)."""
    too_large = ApiError(413, f"the request body is larger than the server's limit of {max_bytes} bytes "
                              "(peftlab serve --max-body-bytes)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks).decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise ApiError(status, f"the body is not valid UTF-8 (byte {err.start}); send UTF-8 JSON") from None
    except ValueError as err:  # json.JSONDecodeError, or NaN / Infinity
        raise ApiError(status, f"the body is not valid JSON: {err}") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                  for e in err.errors(include_url=False, include_input=False, include_context=False)]
        first = errors[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        raise ApiError(status, f"{param or 'body'}: {first['msg']}", param=param, detail=errors) from None


def check_key(request: Any, api_key: str | None) -> None:
    """Raise 401 unless ``api_key`` is unset or the request carries ``Authorization: Bearer <api_key>``
    (compared in constant time)."""
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>' with the key "
                            "the server was started with (--api-key / PEFTLAB_API_KEY)", code="invalid_api_key")


def install_error_handler(app: Any) -> None:
    """Answer :class:`ApiError` as JSON in the shape of the endpoint family (``/v1/`` → OpenAI's)."""
    from fastapi.responses import JSONResponse

    @app.exception_handler(ApiError)
    async def api_error(request: Any, err: ApiError) -> JSONResponse:
        headers = {"www-authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(request.url.path.startswith("/v1/")), status_code=err.status, headers=headers)
