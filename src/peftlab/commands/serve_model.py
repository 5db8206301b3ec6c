"""The model side of ``peftlab serve``: adapters of one base model answering lists of jobs as mixed batches, and
the batching worker that feeds them.

A :class:`Job` is one request already checked and tokenized by the HTTP side (prompt ids that fit the model's
context), so a batch can only fail for a reason inside the model; when one does, the :class:`Batcher` runs its
jobs again one by one, so only the job that fails gets an error.

Decoding: greedy jobs with the same ``max_new_tokens`` / ``num_beams`` and no stop strings or streaming share one
left-padded ``generate`` call; a sampled job (``temperature`` > 0), a job with stop strings and a streamed job run
alone, a sampled one under its own ``seed`` (``torch.manual_seed`` inside ``fork_rng``), so its text does not
depend on what else is queued. Every ``generate`` call also stops at the next token once the server shuts down.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import RecipeError
from peftlab.mixed import BASE, normalize

GENERATE, CLASSIFY = "generate", "classify"


class ShuttingDown(Exception):
    """The server is stopping; the job was not (fully) run."""


@dataclass
class Job:
    """One checked request: prompt token ids and how to decode (``temperature`` 0 is greedy)."""

    adapter: str | list[str]
    ids: list[int]
    max_new_tokens: int = 0  # 0 for classification
    num_beams: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # streaming: called from the worker thread with each new piece
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away

    @property
    def batchable(self) -> bool:
        return self.temperature == 0 and not self.stop and self.on_text is None


def context_size(model: Any, tokenizer: Any) -> int:
    """The most positions the model takes: its config's ``max_position_embeddings`` / ``n_positions``, else the
    tokenizer's ``model_max_length`` (a huge default counts as no limit: 2**31)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 2**31 else 2**31


class Watch:
    """An HF streamer for one row: decodes the new tokens, cuts the text before the first stop string, and hands
    ``on_text`` each piece that can no longer change (text that might begin a stop string, or an unfinished
    UTF-8 character, waits). The pieces joined equal :attr:`text`, the final answer."""

    def __init__(self, decode: Callable[[list[int]], str], eos: int, stop: tuple[str, ...],
                 on_text: Callable[[str], None] | None) -> None:
        self.decode, self.eos, self.stop, self.on_text = decode, eos, stop, on_text
        self.tokens: list[int] = []
        self.text, self.sent, self.done, self.prompt_seen = "", 0, False, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first passes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.done:
                return
            if token == self.eos:
                self.done = True
                return
            self.tokens.append(token)
            self.text = self.decode(self.tokens)
            cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if cuts:
                self.text, self.done = self.text[:min(cuts)], True
                return
            held = max((len(s) - 1 for s in self.stop), default=0)
            safe = len(self.text) - held
            while safe > self.sent and self.text[safe - 1] == "\ufffd":
                safe -= 1
            self.emit(safe)

    def emit(self, upto: int) -> None:
        if upto > self.sent:
            if self.on_text is not None:
                self.on_text(self.text[self.sent:upto])
            self.sent = upto

    def end(self) -> None:
        self.emit(len(self.text))


class Halt:
    """A stopping criterion: every row stops once ``stopping`` is set (server shutdown), the client went away, or
    the watched row is finished."""

    def __init__(self, stopping: threading.Event, jobs: list[Job], watch: Watch | None = None) -> None:
        self.stopping, self.jobs, self.watch = stopping, jobs, watch

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        halt = (self.stopping.is_set() or all(j.cancelled.is_set() for j in self.jobs)
                or (self.watch is not None and self.watch.done))
        return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)


@dataclass
class ServedModel:
    """A base model with named adapters loaded from folders, answering lists of jobs as mixed batches."""

    model: Any  # AdapterModel
    tokenizer: Any
    task: str  # GENERATE or CLASSIFY
    folders: dict[str, str] = field(default_factory=dict)
    name: str = "base"
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the tokenizer is not safe across threads

    @classmethod
    def load(cls, model_name: str, adapters: dict[str, str | os.PathLike]) -> ServedModel:
        """Load ``model_name`` and every adapter folder (name → folder); all must be of one task."""
        from peftlab.base_models import load_causal_lm, load_classifier
        from peftlab.model import AdapterModel
        from peftlab.recipes import task_of
        from peftlab.recipes.text.classification import saved_labels

        if not adapters:
            raise RecipeError("give at least one adapter to serve: --adapter NAME=FOLDER")
        if BASE in adapters or model_name in adapters:
            raise RecipeError(f"{BASE!r} and the model's name {model_name!r} are reserved for the base model; "
                              "give the adapter another name")
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
        return cls(model.eval(), tokenizer, task, {n: str(f) for n, f in adapters.items()}, name=model_name)

    @property
    def context(self) -> int:
        return context_size(self.model, self.tokenizer)

    def check(self, adapter: str | list[str]) -> None:
        """Raise ``LookupError`` for an unknown adapter name, :class:`AdapterError` for an invalid entry."""
        names = [adapter] if isinstance(adapter, str) else adapter
        unknown = [n for n in names if n not in self.model.peft_config and n != BASE]
        if unknown:
            raise LookupError(f"no adapter named {unknown[0]!r}; loaded adapters: {list(self.model.peft_config)} "
                              f"(or {BASE!r} for the base model)")
        copies = {name: list(w.copies) for name, w in self.model._copies()}
        normalize([adapter], list(self.model.peft_config), copies)

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (which must be valid Unicode: the HTTP side checks)."""
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        adapters = {name: {"method": config.method, "r": config.r, "folder": self.folders.get(name)}
                    for name, config in self.model.peft_config.items()}
        return {"task": self.task, "base": BASE, "adapters": adapters, "context": self.context}

    def run(self, kind: str, jobs: list[Job]) -> list[dict[str, Any]]:
        """Answer jobs of one kind (see the module docstring for which share a ``generate`` call)."""
        if kind == CLASSIFY:
            return self.classify(jobs)
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        groups: dict[Any, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.max_new_tokens, job.num_beams) if job.batchable else i, []).append(i)
        for rows in groups.values():
            for i, answer in zip(rows, self.generate([jobs[i] for i in rows]), strict=True):
                results[i] = answer
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def generate(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """One left-padded mixed-adapter ``generate`` call for ``jobs`` (one job unless all are batchable).
        Each answer: ``text``, ``num_tokens`` (generated, without EOS), ``prompt_tokens`` and ``finish_reason``
        (``"stop"``: EOS or a stop string, ``"length"``: ``max_new_tokens`` reached)."""
        from peftlab.recipes.text.generation import eos_id

        first, eos, pad = jobs[0], eos_id(self.tokenizer), self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        width = max(len(j.ids) for j in jobs)
        input_ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in jobs], device=device)
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs], device=device)
        watch = None if first.batchable else Watch(self.decode, eos, first.stop, first.on_text)
        sampling: dict[str, Any] = {"do_sample": False}
        if first.temperature > 0:
            sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p, "top_k": 0}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if first.seed is not None:
                torch.manual_seed(first.seed)
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, adapter_names=[j.adapter for j in jobs],
                max_new_tokens=first.max_new_tokens, num_beams=first.num_beams, pad_token_id=pad, eos_token_id=eos,
                stopping_criteria=[Halt(self.stopping, jobs, watch)], streamer=watch, **sampling)
        if watch is not None:
            done = watch.done or len(watch.tokens) < first.max_new_tokens
            return [{"adapter": first.adapter, "text": watch.text, "num_tokens": len(watch.tokens),
                     "prompt_tokens": len(first.ids), "finish_reason": "stop" if done else "length"}]
        answers = []
        for job, ids in zip(jobs, out[:, width:].tolist(), strict=True):
            tokens = ids[:ids.index(eos)] if eos in ids else ids
            answers.append({"adapter": job.adapter, "text": self.decode(tokens), "num_tokens": len(tokens),
                            "prompt_tokens": len(job.ids), "finish_reason": "stop" if eos in ids else "length"})
        return answers

    @torch.no_grad()
    def classify(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """One mixed-adapter forward for ``jobs``: softmax scores per label and the most probable label."""
        with self.lock:
            batch = self.tokenizer.pad({"input_ids": [j.ids for j in jobs]}, return_tensors="pt")
        batch = batch.to(next(self.model.parameters()).device)
        logits = self.model(**batch, adapter_names=[j.adapter for j in jobs]).logits.float()
        id2label = self.model.config.id2label
        answers = []
        for job, scores in zip(jobs, logits.softmax(-1).tolist(), strict=True):
            best = max(range(len(scores)), key=scores.__getitem__)
            answers.append({"adapter": job.adapter, "label": id2label.get(best, str(best)),
                            "scores": {id2label.get(i, str(i)): s for i, s in enumerate(scores)}})
        return answers


class Batcher:
    """An asyncio queue and one worker that runs the waiting jobs in batches of up to ``max_batch_size``,
    waiting at most ``max_wait_ms`` after the first one for more to arrive. A failing batch is run again job by
    job, so one bad job never fails another; once :meth:`stop` is called, running and waiting jobs (and new
    ones) fail with :class:`ShuttingDown`."""

    def __init__(self, run: Callable[[str, list[Any]], list[Any]], max_batch_size: int, max_wait_ms: float,
                 stopping: threading.Event | None = None) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise RecipeError(f"max_batch_size must be >= 1 and max_wait_ms >= 0; got {max_batch_size}, {max_wait_ms}")
        self.run, self.max_batch_size, self.max_wait = run, max_batch_size, max_wait_ms / 1000
        self.stopping = stopping or threading.Event()
        self.queue: asyncio.Queue[tuple[str, Any, asyncio.Future]] = asyncio.Queue()
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "running": 0}

    def stop(self) -> None:
        """Make the running ``generate`` end at its next token and fail every job (thread-safe)."""
        self.stopping.set()

    async def submit(self, kind: str, job: Any) -> Any:
        if self.stopping.is_set():
            raise ShuttingDown("the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((kind, job, future))
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
                await self.answer(kind, [(r, f) for k, r, f in batch if k == kind])

    async def answer(self, kind: str, items: list[tuple[Any, asyncio.Future]]) -> None:
        """Run ``items`` as one batch; if it fails, run each alone so that only the failing ones fail."""
        if self.stopping.is_set():
            for _, f in items:
                if not f.done():
                    f.set_exception(ShuttingDown("the server is shutting down; the request was not run"))
            return
        self.stats["running"] = len(items)
        try:
            results = await asyncio.to_thread(self.run, kind, [r for r, _ in items])
        except Exception as err:  # the requests fail; the server goes on
            if len(items) > 1 and not self.stopping.is_set():
                for item in items:
                    await self.answer(kind, [item])
                return
            results = [err] * len(items)
        finally:
            self.stats["running"] = 0
        for (_, f), result in zip(items, results, strict=True):
            if f.done():
                continue
            if self.stopping.is_set():
                f.set_exception(ShuttingDown("the server is shutting down; the request was not finished"))
            elif isinstance(result, Exception):
                f.set_exception(result)
            else:
                f.set_result(result)
