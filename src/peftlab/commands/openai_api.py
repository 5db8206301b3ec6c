"""OpenAI-compatible endpoints of ``peftlab serve``, so the official ``openai`` client (and tools built on it)
can talk to the served adapters:

- ``GET /v1/models``: the adapters and the base model (its ``--model`` name), each an OpenAI model object.
- ``POST /v1/completions``: ``{"model", "prompt", "max_tokens" (16), "temperature" (1), "top_p" (1), "seed",
  "stop", "n" (1 only), "stream"}`` → a ``text_completion``.
- ``POST /v1/chat/completions``: ``{"model", "messages", ...}`` the same options (``max_tokens`` /
  ``max_completion_tokens``, default: the rest of the context); the messages go through the tokenizer's chat
  template → a ``chat.completion``.

``model`` is an adapter's name, or the base model's name (or ``__base__``) for no adapter. ``temperature`` 0 is
greedy decoding (batched with other greedy requests); above 0 it samples with ``top_p`` (nucleus), alone and, with
``seed``, reproducibly. Generation ends at EOS, after ``max_tokens``, or before the first of up to four ``stop``
strings (``finish_reason`` ``"stop"`` or ``"length"``); ``usage`` counts prompt and completion tokens.
``stream: true`` answers server-sent events: ``data: {chunk}`` per piece of text as it is generated, a last chunk
with the ``finish_reason`` (and, with ``stream_options.include_usage``, one with ``usage``), then
``data: [DONE]``; the pieces joined are the text the same request gives without streaming.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: unknown model 404, missing or wrong
key 401, a bad parameter or a prompt beyond the context 400, body over the limit 413, shutting down 503.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from peftlab.commands.serve_http import ApiError, check_text, read_body
from peftlab.commands.serve_model import GENERATE, Job
from peftlab.mixed import BASE

MAX_STOPS = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The options both endpoints share (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"n={value}: peftlab serve returns one choice per request; send n=1 (or {value} "
                             "requests, with different seeds)")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"give at most {MAX_STOPS} stop strings, got {len(stops)}")
        return [check_text(s, "a stop string") for s in stops]


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError(f"got {len(value)} prompts; send one prompt per request")
            value = value[0]
        return check_text(value, "prompt")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _text(cls, value: str | list[TextPart]) -> str:
        text = value if isinstance(value, str) else "".join(part.text for part in value)
        return check_text(text, "message content", allow_empty=True)  # the template adds the roles


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def sse(data: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, completion = result["prompt_tokens"], result["num_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def add_openai_routes(app: Any, service: Any, dependencies: list[Any]) -> None:
    """Add ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` to ``app`` (a :class:`Service`'s)."""
    served = service.served

    def adapter_of(model: str) -> str:
        if model in (served.name, BASE):
            return BASE
        if model not in served.model.peft_config:
            raise ApiError(404, f"the model {model!r} does not exist; this server has "
                                f"{[served.name, *served.model.peft_config]} (GET /v1/models)",
                           param="model", code="model_not_found")
        return model

    def chat_prompt(messages: list[Message]) -> str:
        if not getattr(served.tokenizer, "chat_template", None):
            raise ApiError(400, f"the model {served.name!r} has no chat template in its tokenizer; use "
                                "/v1/completions with a plain prompt", param="messages")
        try:
            return served.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                                        add_generation_prompt=True)
        except Exception as err:  # the template refused the conversation (e.g. roles out of order)
            raise ApiError(400, f"the chat template refused the messages: {err}", param="messages") from None

    async def job_of(body: Sampling, prompt: str, max_tokens: int | None, chat: bool) -> Job:
        if served.task != GENERATE:
            raise ApiError(400, "this server holds classifiers; the OpenAI endpoints need a causal LM")
        adapter = adapter_of(body.model)
        param = "messages" if chat else "prompt"
        ids = await service.tokens(prompt, max_tokens or 0, param, status=400, special_tokens=not chat)
        if max_tokens is None:
            max_tokens = served.context - len(ids)
        if max_tokens < 1:
            raise ApiError(400, f"the {param} fills the model's context of {served.context} tokens; shorten it",
                           param=param, code="context_length_exceeded")
        return Job(adapter, ids, max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                   stop=tuple(body.stop or ()))

    async def respond(body: Sampling, job: Job, chat: bool) -> Any:
        """The answer to ``job``: a completion object, or with ``stream`` an event stream of chunks."""
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body.model}

        def choice(text: str, finish: str | None, streamed: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if streamed:
                return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                        "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}

        if not body.stream:
            result = await service.run(GENERATE, job)
            return {**head, "choices": [choice(result["text"], result["finish_reason"])], "usage": usage(result)}
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        first = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]}] if chat else []
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return stream(service, job, first, lambda text, finish: {**head, "choices": [choice(text, finish, True)]},
                      lambda result: {**head, "choices": [], "usage": usage(result)} if include_usage else None)

    @app.get("/v1/models", dependencies=dependencies)
    async def models() -> dict[str, Any]:
        names = [served.name, *served.model.peft_config]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "peftlab"}
                                           for n in names]}

    @app.post("/v1/completions", dependencies=dependencies)
    async def completions(request: Request) -> Any:
        body = await read_body(request, CompletionRequest, service.max_body_bytes, status=400)
        job = await job_of(body, body.prompt, body.max_tokens, chat=False)
        return await respond(body, job, chat=False)

    @app.post("/v1/chat/completions", dependencies=dependencies)
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request, ChatRequest, service.max_body_bytes, status=400)
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = await job_of(body, chat_prompt(body.messages), max_tokens, chat=True)
        return await respond(body, job, chat=True)


def stream(service: Any, job: Job, first: list[dict[str, Any]], chunk: Callable[[str, str | None], dict[str, Any]],
           last: Callable[[dict[str, Any]], dict[str, Any] | None]) -> StreamingResponse:
    """Run ``job`` with its text streamed as server-sent events; a client that goes away stops the generation."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    job.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
    task = asyncio.ensure_future(service.run(GENERATE, job))
    task.add_done_callback(lambda _: pieces.put_nowait(None))  # after every piece: both come through the loop

    async def events() -> AsyncIterator[str]:
        try:
            for event in first:
                yield sse(event)
            while (piece := await pieces.get()) is not None:
                yield sse(chunk(piece, None))
            try:
                result = task.result()
            except ApiError as err:
                yield sse(err.body(openai=True))
            else:
                yield sse(chunk("", result["finish_reason"]))
                if (tail := last(result)) is not None:
                    yield sse(tail)
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()
            task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")
