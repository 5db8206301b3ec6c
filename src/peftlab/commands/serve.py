"""``peftlab serve``: several adapters of one base model behind a small HTTP server (FastAPI + uvicorn).

    peftlab serve --model smollm2-135m --adapter math=runs/math --adapter chat=runs/chat --port 8000

Endpoints (JSON):

- ``POST /generate`` ``{"adapter": "math", "prompt": "...", "max_new_tokens": 32, "num_beams": 1}`` (causal LMs)
  → ``{"adapter", "text", "num_tokens"}``; greedy decoding, or beam search with ``num_beams`` > 1.
- ``POST /classify`` ``{"adapter": "sst", "text": "..."}`` (sequence classifiers) → ``{"adapter", "label",
  "scores"}`` (softmax over the labels).
- ``GET /adapters``: the loaded adapters (method, rank, folder) and the task; ``GET /health``: status and
  batching counters.

``adapter`` is a loaded adapter's name, ``"__base__"`` for the base model, or a list of names to compose (as
``set_adapter([...])``). An unknown name answers 404 naming the loaded ones. A body that is not valid UTF-8 JSON,
misses a field, or holds an empty text, a lone surrogate or ``NaN`` answers 422; so does a prompt that does not
fit the model's context with ``max_new_tokens`` more, before it is queued; a body over ``--max-body-bytes``
answers 413. With ``--api-key`` (or ``PEFTLAB_API_KEY``) every endpoint but ``/health`` answers 401 without
``Authorization: Bearer KEY``. The OpenAI-compatible ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` are in :mod:`peftlab.commands.openai_api`.

Batching: requests go into an asyncio queue; one worker takes the first waiting request, collects more until it
holds ``max_batch_size`` or ``max_wait_ms`` has passed, and runs them as mixed-adapter batches
(:mod:`peftlab.mixed`; generation requests with the same ``max_new_tokens`` / ``num_beams`` share one
``generate`` call). The model runs in a worker thread (:mod:`peftlab.commands.serve_model`), one batch at a
time, so the server keeps accepting requests meanwhile. Each row's result is what the model gives that row alone
with its adapter active (up to float rounding of padded batches). A batch that fails runs again request by
request, so one bad request never fails another. One SIGTERM / Ctrl-C stops the server promptly: the running
``generate`` ends at its next token and its requests (and the queued ones) answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from peftlab.commands.serve_http import ApiError, check_key, check_text, install_error_handler, read_body
from peftlab.commands.serve_model import CLASSIFY, GENERATE, Batcher, Job, ServedModel, ShuttingDown
from peftlab.errors import AdapterError, RecipeError

__all__ = ["ClassifyRequest", "GenerateRequest", "ServedModel", "create_app", "serve"]
MAX_BODY_BYTES = 1 << 20


class GenerateRequest(BaseModel):
    """Body of ``POST /generate``."""

    model_config = ConfigDict(extra="forbid")
    adapter: str | list[str] = Field(description="adapter name, '__base__', or a list of names to compose")
    prompt: str
    max_new_tokens: int = Field(32, ge=1, le=4096)
    num_beams: int = Field(1, ge=1, le=16)

    @field_validator("prompt")
    @classmethod
    def _text(cls, value: str) -> str:
        return check_text(value, "prompt")


class ClassifyRequest(BaseModel):
    """Body of ``POST /classify``."""

    model_config = ConfigDict(extra="forbid")
    adapter: str | list[str] = Field(description="adapter name, '__base__', or a list of names to compose")
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return check_text(value, "text")


class Service:
    """The served model, its batcher and the limits; what the endpoints share."""

    def __init__(self, served: ServedModel, max_batch_size: int, max_wait_ms: float, max_body_bytes: int,
                 api_key: str | None) -> None:
        if max_body_bytes < 1:
            raise RecipeError(f"max_body_bytes must be >= 1; got {max_body_bytes}")
        self.served, self.max_body_bytes, self.api_key = served, max_body_bytes, api_key or None
        self.batcher = Batcher(served.run, max_batch_size, max_wait_ms, served.stopping)

    def authorize(self, request: Request) -> None:
        check_key(request, self.api_key)

    def check_adapter(self, adapter: str | list[str], param: str = "adapter") -> None:
        try:
            self.served.check(adapter)
        except LookupError as err:
            raise ApiError(404, str(err), param=param, code="model_not_found") from None
        except AdapterError as err:
            raise ApiError(422, str(err), param=param) from None

    async def tokens(self, text: str, max_new_tokens: int, param: str, status: int = 422,
                     special_tokens: bool = True) -> list[int]:
        """``text``'s token ids, refused (``status``) when they and ``max_new_tokens`` more do not fit the model."""
        ids = await asyncio.to_thread(self.served.encode, text, special_tokens)
        context = self.served.context
        if not ids:
            raise ApiError(status, f"{param} gives no tokens; give some text", param=param)
        if len(ids) + max_new_tokens > context:
            more = f" + {max_new_tokens} new tokens" if max_new_tokens else ""
            raise ApiError(status, f"{param} has {len(ids)} tokens{more}, more than the model's context of "
                                   f"{context} positions; shorten it" + (" or ask for fewer tokens" if more else ""),
                           param=param, code="context_length_exceeded")
        return ids

    async def run(self, kind: str, job: Job) -> dict[str, Any]:
        try:
            return await self.batcher.submit(kind, job)
        except ShuttingDown as err:
            raise ApiError(503, str(err)) from None
        except Exception as err:
            raise ApiError(500, f"{type(err).__name__}: {err}") from None


def create_app(served: ServedModel, max_batch_size: int = 8, max_wait_ms: float = 10.0,
               max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None):
    """The FastAPI application serving ``served`` (its :class:`Batcher` is ``app.state.service.batcher``)."""
    from fastapi import Depends, FastAPI

    from peftlab.commands.openai_api import add_openai_routes

    service = Service(served, max_batch_size, max_wait_ms, max_body_bytes, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.stopping.clear()  # the model may have been served (and stopped) before
        worker = asyncio.create_task(service.batcher.work())
        yield
        service.batcher.stop()
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker

    app = FastAPI(title="peftlab serve", lifespan=lifespan)
    app.state.service = service
    keyed = [Depends(service.authorize)]  # every endpoint but /health
    install_error_handler(app)

    async def answer(kind: str, request: Request, model: type[BaseModel]) -> dict[str, Any]:
        body: Any = await read_body(request, model, service.max_body_bytes)
        if kind != served.task:
            other = "/classify" if served.task == CLASSIFY else "/generate"
            raise ApiError(400, f"this server holds {served.task} adapters; POST {other} instead")
        service.check_adapter(body.adapter)
        if kind == CLASSIFY:
            job = Job(body.adapter, await service.tokens(body.text, 0, "text"))
        else:
            ids = await service.tokens(body.prompt, body.max_new_tokens, "prompt")
            job = Job(body.adapter, ids, body.max_new_tokens, body.num_beams)
        result = await service.run(kind, job)
        return {k: v for k, v in result.items() if k not in ("prompt_tokens", "finish_reason")}

    @app.post("/generate", dependencies=keyed)
    async def generate(request: Request) -> dict[str, Any]:
        return await answer(GENERATE, request, GenerateRequest)

    @app.post("/classify", dependencies=keyed)
    async def classify(request: Request) -> dict[str, Any]:
        return await answer(CLASSIFY, request, ClassifyRequest)

    @app.get("/adapters", dependencies=keyed)
    async def adapters() -> dict[str, Any]:
        return served.describe()

    @app.get("/health")
    async def health() -> dict[str, Any]:  # open without the API key, for load balancers and probes
        return {"status": "stopping" if service.batcher.stopping.is_set() else "ok", **service.batcher.stats}

    add_openai_routes(app, service, keyed)
    return app


def serve(model: str, adapters: dict[str, str], host: str = "127.0.0.1", port: int = 8000,
          max_batch_size: int = 8, max_wait_ms: float = 10.0, max_body_bytes: int = MAX_BODY_BYTES,
          api_key: str | None = None) -> None:
    """Load the model and adapters, then serve them until Ctrl-C / SIGTERM: the first signal stops the running
    ``generate`` at its next token, answers the open requests 503 and exits with status 0."""
    import signal

    import uvicorn

    app = create_app(ServedModel.load(model, adapters), max_batch_size, max_wait_ms, max_body_bytes, api_key)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.service.batcher.stop()
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once shut down, which would end the process with a signal status
            self._captured_signals = [s for s in self._captured_signals if s not in (signal.SIGINT, signal.SIGTERM)]

    Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (an argparse ``type``)."""
    import argparse

    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; give a number from 0 to 65535")
    return port


def name_folder(text: str) -> tuple[str, str]:
    """``NAME=FOLDER`` → ``(NAME, FOLDER)`` (an argparse ``type``)."""
    import argparse

    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {text!r}")
    return name.strip(), folder.strip()


def add_flags(p: Any) -> None:
    """The flags of ``peftlab serve``."""
    from peftlab.cli_flags import positive_int

    p.add_argument("--model", required=True, help="base model: a known name (smollm2-135m, minilm), a folder or a "
                   "Hub name")
    p.add_argument("--adapter", action="append", type=name_folder, metavar="NAME=FOLDER", required=True,
                   help="an adapter folder to serve under NAME (repeat the flag for several)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="port, 0-65535 (default 8000)")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="most requests in one batch (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for more (default 10)")
    p.add_argument("--max-body-bytes", type=positive_int, default=MAX_BODY_BYTES,
                   help=f"largest request body; a larger one answers 413 (default {MAX_BODY_BYTES}, 1 MiB)")
    p.add_argument("--api-key", default=os.environ.get("PEFTLAB_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: the "
                        "PEFTLAB_API_KEY environment variable, which keeps the key out of the process list)")


def main(args: Any) -> int:
    """``peftlab serve`` with parsed ``args``."""
    adapters = dict(args.adapter)
    if len(adapters) < len(args.adapter):
        raise RecipeError("two --adapter flags use the same NAME; give each adapter its own name")
    serve(args.model, adapters, args.host, args.port, args.max_batch_size, args.max_wait_ms, args.max_body_bytes,
          args.api_key)
    return 0
