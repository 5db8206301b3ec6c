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
``set_adapter([...])``). An unknown name answers 404 naming the loaded ones; a body that is not valid JSON or
misses a field answers 422.

Batching: requests go into an asyncio queue; one worker takes the first waiting request, collects more until it
holds ``max_batch_size`` or ``max_wait_ms`` has passed, and runs them as mixed-adapter batches
(:mod:`peftlab.mixed`; generation requests with the same ``max_new_tokens`` / ``num_beams`` share one
``generate`` call). The model runs in a worker thread, one batch at a time, so the server keeps accepting
requests meanwhile. Each row's result is what the model gives that row alone with its adapter active (up to
float rounding of padded batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from peftlab.errors import AdapterError, RecipeError
from peftlab.mixed import BASE, normalize

GENERATE, CLASSIFY = "generate", "classify"


class GenerateRequest(BaseModel):
    """Body of ``POST /generate``."""

    model_config = ConfigDict(extra="forbid")
    adapter: str | list[str] = Field(description="adapter name, '__base__', or a list of names to compose")
    prompt: str
    max_new_tokens: int = Field(32, ge=1, le=4096)
    num_beams: int = Field(1, ge=1, le=16)


class ClassifyRequest(BaseModel):
    """Body of ``POST /classify``."""

    model_config = ConfigDict(extra="forbid")
    adapter: str | list[str] = Field(description="adapter name, '__base__', or a list of names to compose")
    text: str


# -- the model side ---------------------------------------------------------------------------------------------
@dataclass
class ServedModel:
    """A base model with named adapters loaded from folders, answering lists of requests as mixed batches."""

    model: Any  # AdapterModel
    tokenizer: Any
    task: str  # GENERATE or CLASSIFY
    folders: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, model_name: str, adapters: dict[str, str | os.PathLike]) -> ServedModel:
        """Load ``model_name`` and every adapter folder (name → folder); all must be of one task."""
        from peftlab.base_models import load_causal_lm, load_classifier
        from peftlab.model import AdapterModel
        from peftlab.recipes import task_of
        from peftlab.recipes.text.classification import saved_labels

        if not adapters:
            raise RecipeError("give at least one adapter to serve: --adapter NAME=FOLDER")
        if BASE in adapters:
            raise RecipeError(f"{BASE!r} is reserved for the base model; give the adapter another name")
        for name, folder in adapters.items():
            if not Path(folder).is_dir():
                raise RecipeError(f"adapter {name!r}: {folder} is not a folder")
        tasks = {name: task_of(folder) for name, folder in adapters.items()}
        kinds = {CLASSIFY if t == "classification" else GENERATE for t in tasks.values()}
        if len(kinds) > 1:
            raise RecipeError(f"the adapters mix classification and generation tasks ({tasks}); serve one kind at "
                              "a time, each on its own base model")
        task = kinds.pop()
        if task == CLASSIFY:
            labels = {name: saved_labels(folder) for name, folder in adapters.items()}
            if len({count for _, count in labels.values()}) > 1:
                raise RecipeError(f"the classifiers have different numbers of labels: "
                                  f"{ {n: c for n, (_, c) in labels.items()} }")
            names, count = next(iter(labels.values()))
            base, tokenizer = load_classifier(model_name, count, label_names=names)
        else:
            base, tokenizer = load_causal_lm(model_name)
        model = AdapterModel(base)
        for name, folder in adapters.items():  # each adapter built on meta and given the file's tensors
            model.load_adapter(folder, name, low_cpu_mem_usage=True)
        return cls(model.eval(), tokenizer, task, {n: str(f) for n, f in adapters.items()})

    def check(self, adapter: str | list[str]) -> None:
        """Raise ``LookupError`` for an unknown adapter name, :class:`AdapterError` for an invalid entry."""
        names = [adapter] if isinstance(adapter, str) else adapter
        unknown = [n for n in names if n not in self.model.peft_config and n != BASE]
        if unknown:
            raise LookupError(f"no adapter named {unknown[0]!r}; loaded adapters: {list(self.model.peft_config)} "
                              f"(or {BASE!r} for the base model)")
        copies = {name: list(w.copies) for name, w in self.model._copies()}
        normalize([adapter], list(self.model.peft_config), copies)

    def describe(self) -> dict[str, Any]:
        adapters = {name: {"method": config.method, "r": config.r, "folder": self.folders.get(name)}
                    for name, config in self.model.peft_config.items()}
        return {"task": self.task, "base": BASE, "adapters": adapters}

    def run(self, kind: str, requests: list[Any]) -> list[dict[str, Any]]:
        """Answer requests of one kind; generation requests are grouped by their decoding options."""
        if kind == CLASSIFY:
            return self.classify(requests)
        results: list[dict[str, Any] | None] = [None] * len(requests)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_new_tokens, r.num_beams), []).append(i)
        for (max_new_tokens, num_beams), rows in groups.items():
            answers = self.generate([requests[i] for i in rows], max_new_tokens, num_beams)
            for i, answer in zip(rows, answers, strict=True):
                results[i] = answer
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def generate(self, requests: list[GenerateRequest], max_new_tokens: int, num_beams: int) -> list[dict[str, Any]]:
        """One left-padded mixed-adapter ``generate`` call for ``requests``."""
        from peftlab.recipes.text.generation import eos_id

        tokenizer, side = self.tokenizer, self.tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batch = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        batch = batch.to(next(self.model.parameters()).device)
        out = self.model.generate(**batch, adapter_names=[r.adapter for r in requests], max_new_tokens=max_new_tokens,
                                  num_beams=num_beams, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=eos_id(tokenizer))
        answers = []
        for r, ids in zip(requests, out[:, batch["input_ids"].shape[1]:], strict=True):
            tokens = ids.tolist()
            if eos_id(tokenizer) in tokens:
                tokens = tokens[:tokens.index(eos_id(tokenizer))]
            answers.append({"adapter": r.adapter, "text": tokenizer.decode(tokens, skip_special_tokens=True),
                            "num_tokens": len(tokens)})
        return answers

    @torch.no_grad()
    def classify(self, requests: list[ClassifyRequest]) -> list[dict[str, Any]]:
        """One mixed-adapter forward for ``requests``: softmax scores per label and the most probable label."""
        batch = self.tokenizer([r.text for r in requests], return_tensors="pt", padding=True, truncation=True)
        batch = batch.to(next(self.model.parameters()).device)
        logits = self.model(**batch, adapter_names=[r.adapter for r in requests]).logits.float()
        id2label = self.model.config.id2label
        answers = []
        for r, scores in zip(requests, logits.softmax(-1).tolist(), strict=True):
            best = max(range(len(scores)), key=scores.__getitem__)
            answers.append({"adapter": r.adapter, "label": id2label.get(best, str(best)),
                            "scores": {id2label.get(i, str(i)): s for i, s in enumerate(scores)}})
        return answers


# -- batching ----------------------------------------------------------------------------------------------------
class Batcher:
    """An asyncio queue and one worker that runs the waiting requests in batches of up to ``max_batch_size``,
    waiting at most ``max_wait_ms`` after the first one for more to arrive."""

    def __init__(self, run: Callable[[str, list[Any]], list[Any]], max_batch_size: int, max_wait_ms: float) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise RecipeError(f"max_batch_size must be >= 1 and max_wait_ms >= 0; got {max_batch_size}, {max_wait_ms}")
        self.run, self.max_batch_size, self.max_wait = run, max_batch_size, max_wait_ms / 1000
        self.queue: asyncio.Queue[tuple[str, Any, asyncio.Future]] = asyncio.Queue()
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}

    async def submit(self, kind: str, request: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((kind, request, future))
        return await future

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0)))
                except TimeoutError:
                    break
            self.stats["batches"] += 1
            self.stats["requests"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            for kind in dict.fromkeys(k for k, _, _ in batch):
                items = [(r, f) for k, r, f in batch if k == kind]
                try:
                    results = await asyncio.to_thread(self.run, kind, [r for r, _ in items])
                except Exception as err:  # the requests fail; the server goes on
                    for _, f in items:
                        if not f.done():
                            f.set_exception(err)
                    continue
                for (_, f), result in zip(items, results, strict=True):
                    if not f.done():
                        f.set_result(result)


# -- the HTTP side -----------------------------------------------------------------------------------------------
def create_app(served: ServedModel, max_batch_size: int = 8, max_wait_ms: float = 10.0):
    """The FastAPI application serving ``served``."""
    from fastapi import FastAPI, HTTPException

    batcher = Batcher(served.run, max_batch_size, max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.work())
        yield
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker

    app = FastAPI(title="peftlab serve", lifespan=lifespan)

    async def answer(kind: str, request: GenerateRequest | ClassifyRequest) -> dict[str, Any]:
        if kind != served.task:
            other = "/classify" if served.task == CLASSIFY else "/generate"
            raise HTTPException(400, f"this server holds {served.task} adapters; POST {other} instead")
        try:
            served.check(request.adapter)
        except LookupError as err:
            raise HTTPException(404, str(err)) from None
        except AdapterError as err:
            raise HTTPException(422, str(err)) from None
        try:
            return await batcher.submit(kind, request)
        except Exception as err:
            raise HTTPException(500, f"{type(err).__name__}: {err}") from None

    @app.post("/generate")
    async def generate(request: GenerateRequest) -> dict[str, Any]:
        return await answer(GENERATE, request)

    @app.post("/classify")
    async def classify(request: ClassifyRequest) -> dict[str, Any]:
        return await answer(CLASSIFY, request)

    @app.get("/adapters")
    async def adapters() -> dict[str, Any]:
        return served.describe()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **batcher.stats}

    return app


def serve(model: str, adapters: dict[str, str], host: str = "127.0.0.1", port: int = 8000,
          max_batch_size: int = 8, max_wait_ms: float = 10.0) -> None:
    """Load the model and adapters, then serve them until interrupted (Ctrl-C / SIGTERM shut down cleanly)."""
    import uvicorn

    app = create_app(ServedModel.load(model, adapters), max_batch_size, max_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level="info")


def name_folder(text: str) -> tuple[str, str]:
    """``NAME=FOLDER`` → ``(NAME, FOLDER)`` (an argparse ``type``)."""
    import argparse

    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {text!r}")
    return name.strip(), folder.strip()


def add_flags(p: Any) -> None:
    """The flags of ``peftlab serve``."""
    p.add_argument("--model", required=True, help="base model: a known name (smollm2-135m, minilm), a folder or a "
                   "Hub name")
    p.add_argument("--adapter", action="append", type=name_folder, metavar="NAME=FOLDER", required=True,
                   help="an adapter folder to serve under NAME (repeat the flag for several)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch-size", type=int, default=8, help="most requests in one batch (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for more (default 10)")


def main(args: Any) -> int:
    """``peftlab serve`` with parsed ``args``."""
    adapters = dict(args.adapter)
    if len(adapters) < len(args.adapter):
        raise RecipeError("two --adapter flags use the same NAME; give each adapter its own name")
    serve(args.model, adapters, args.host, args.port, args.max_batch_size, args.max_wait_ms)
    return 0
