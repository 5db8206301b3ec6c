"""What every recipe shares: the method table, run options, the output folder, Trainer arguments, reports.

A recipe is data → model → adapter → ``peftlab.Trainer`` → metrics. This module holds the parts that are
the same for every task, so that each recipe file only says what is special about its task:

* ``METHOD_SPECS``: method name (``hra``, ``lora``, ``hydralora``, ``mtlora[-shim|-icfm|-ctcm|-dtsm]``,
  ``full``, ``linear-probe``) → the adapter config class (looked up by name in ``peftlab.config.METHODS``,
  so methods plug in without this file importing them) and the learning rate that works for it.
* ``RunOptions``: every option of a training run, with per-task defaults; saved as ``run_config.json``.
* ``check_output_dir`` / ``start_output_dir``: never overwrite an earlier result without ``overwrite``;
  find the checkpoint to resume from.
* ``training_arguments``: HF ``TrainingArguments`` (evaluate and save every N steps, keep the best
  checkpoint, ``load_best_model_at_end``, seeded), so ``torchrun`` / ``accelerate launch`` work unchanged.
* ``finish_run``: ``metrics.json``, the adapter (or model), and ``training_curve.png`` in the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab import io
from peftlab._version import __version__
from peftlab.config import METHODS, AdapterConfig, ConfigError
from peftlab.errors import RecipeError
from peftlab.model import AdapterModel, get_adapter_model

RUN_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
CURVE_FILE = "training_curve.png"
TASKS = ("classification", "causal-lm", "data-to-text")
FULL, LINEAR_PROBE = "full", "linear-probe"
HEAD_NAMES = ("pre_classifier", "classifier", "score")  # sequence-classification heads in transformers
# Target pairs tried in order: the first whose layers all exist in the model is the default.
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, MiniLM, ELECTRA
    ("query_proj", "value_proj"),  # DeBERTa-v2/v3
    ("q_proj", "v_proj"),  # Llama, SmolLM2, Mistral, OPT, Qwen
    ("q_lin", "v_lin"),  # DistilBERT
    ("c_attn",),  # GPT-2 (fused q|k|v)
)


@dataclass(frozen=True)
class MethodSpec:
    """How a method name on the command line becomes a model to train.

    Args:
        name: the name users type.
        lr: the learning rate used when none is given: the better of two values tried with MiniLM on
            movie-snippets (batch 32, 100-265 steps) for hra, lora, hydralora, mtlora-shim, full and linear-probe.
        config_method: the key in ``peftlab.config.METHODS`` (``None``: no adapter, ``full`` / ``linear-probe``).
        fixed: config fields the name implies (``mtlora-icfm`` → ``structure="icfm"``).
        description: one line for ``--help``.
    """

    name: str
    lr: float
    config_method: str | None
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("hra", 1e-2, "hra", description="Householder reflections W·H (HRA paper lr 3e-3…1e-2)"),
        MethodSpec("lora", 3e-3, "lora", description="LoRA, W + (α/r)·B·A"),
        MethodSpec("hydralora", 3e-3, "hydralora", description="HydraLoRA: shared A, routed B heads"),
        MethodSpec("mtlora", 3e-3, "mtlora", description="MTLoRA, W + s·B·T·A (structure from --adapter-arg)"),
        *(
            MethodSpec(f"mtlora-{s}", 3e-3, "mtlora", {"structure": s}, f"MTLoRA with T = {t}")
            for s, t in (("shim", "C"), ("icfm", "C·Cᵀ"), ("ctcm", "C·D"), ("dtsm", "C + D"))
        ),
        MethodSpec(FULL, 1e-4, None, description="full fine-tuning, every weight trains"),
        MethodSpec(LINEAR_PROBE, 5e-3, None, description="frozen encoder, only the classification head trains"),
    )
}


def method_spec(name: str) -> MethodSpec:
    """The spec of a method name, or ``RecipeError`` listing the known names."""
    if name not in METHOD_SPECS:
        raise RecipeError(f"unknown method {name!r}; known methods: {', '.join(METHOD_SPECS)}")
    spec = METHOD_SPECS[name]
    if spec.config_method is not None and spec.config_method not in METHODS:
        raise RecipeError(f"method {name!r} is not available in this peftlab (no config registered for it)")
    return spec


# -- run options ----------------------------------------------------------------------------------------------
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"model": "minilm", "data": "movie-snippets", "max_length": 64, "batch_size": 32,
                       "num_beams": 1},
    "causal-lm": {"model": "smollm2-135m", "data": "arithmetic", "max_length": 256, "batch_size": 8,
                  "max_test_samples": 200, "num_beams": 1},
    "data-to-text": {"model": "smollm2-135m", "data": "e2e-synthetic", "max_length": 128, "batch_size": 8,
                     "max_test_samples": 100, "num_beams": 10},
}
# Options that do not change what a run computes until it stops: they may differ when resuming.
NOT_IDENTITY = frozenset({
    "output_dir", "resume", "overwrite", "epochs", "max_steps", "eval_steps", "max_eval_samples",
    "max_test_samples", "eval_batch_size", "max_new_tokens", "num_beams", "length_penalty",
    "no_repeat_ngram_size", "initial_eval", "keep_checkpoints",
})


@dataclass
class RunOptions:
    """Every option of a training run (the CLI flags of ``peftlab train``; ``None`` = the task's default).

    Budget: ``epochs`` (default 1) unless ``max_steps`` is set. Evaluation and checkpoints every
    ``eval_steps``; the best checkpoint (by the task's main metric) is restored at the end.
    ``adapter_args`` are extra fields of the method's config (e.g. ``{"alpha": 16}``).
    """

    task: str = "classification"
    model: str | None = None
    data: str | None = None
    method: str = "hra"
    r: int = 8
    lr: float | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    max_length: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = 500
    max_test_samples: int | None = None
    eval_steps: int = 50
    warmup: float = 0.06
    weight_decay: float = 0.0
    seed: int = 0
    split_seed: int = 0
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    keep_checkpoints: bool = True
    initial_eval: bool = True
    target_modules: list[str] | str | None = None
    adapter_args: dict[str, Any] = field(default_factory=dict)
    # classification
    text_column: str | None = None
    label_column: str | None = None
    num_labels: int | None = None
    glue_task: str | None = None
    # generation (causal-lm, data-to-text)
    max_new_tokens: int = 64
    num_beams: int | None = None
    length_penalty: float = 0.9
    no_repeat_ngram_size: int = 4
    label_smoothing: float = 0.0

    def resolved(self) -> RunOptions:
        """A copy with the task's defaults filled in and every value checked."""
        if self.task not in TASKS:
            raise RecipeError(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        out = dataclasses.replace(self, adapter_args=dict(self.adapter_args))
        for key, value in TASK_DEFAULTS[self.task].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if out.output_dir is None:
            out.output_dir = str(Path("runs") / f"{out.task}-{out.method}-{Path(str(out.data)).stem}")
        spec = method_spec(out.method)
        if out.lr is None:
            out.lr = spec.lr
        if out.eval_batch_size is None:
            out.eval_batch_size = 2 * out.batch_size
        if isinstance(out.target_modules, str) and re.fullmatch(r"[\w.-]+(\s*,\s*[\w.-]+)*", out.target_modules):
            if out.target_modules != "all-linear":  # plain names are suffixes ("query,value"); else a regex
                out.target_modules = [t.strip() for t in out.target_modules.split(",")]
        for name in ("r", "batch_size", "eval_batch_size", "eval_steps", "max_length", "max_new_tokens"):
            _check_positive(name, getattr(out, name))
        for name in ("max_steps", "max_train_samples", "max_eval_samples", "max_test_samples", "num_labels",
                     "num_beams"):
            if getattr(out, name) is not None:
                _check_positive(name, getattr(out, name))
        if not (isinstance(out.lr, (int, float)) and math.isfinite(out.lr) and out.lr > 0):
            raise RecipeError(f"--lr must be a number > 0; got {out.lr!r}")
        for name, low, high in (("warmup", 0, math.inf), ("weight_decay", 0, math.inf), ("label_smoothing", 0, 1),
                                ("no_repeat_ngram_size", 0, math.inf), ("length_penalty", -math.inf, math.inf)):
            value = getattr(out, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value < high):
                raise RecipeError(f"--{name.replace('_', '-')} must be a number in [{low}, {high}); got {value!r}")
        if out.max_steps is None and not out.epochs > 0:
            raise RecipeError(f"--epochs must be > 0 (or give --max-steps); got {out.epochs!r}")
        if out.resume and out.overwrite:
            raise RecipeError("--resume continues the run in the output folder and --overwrite deletes it: pick one")
        if out.method == LINEAR_PROBE and out.task != "classification":
            raise RecipeError("linear-probe trains only a classification head; it needs --task classification")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RecipeError(f"--{name.replace('_', '-')} must be a positive integer; got {value!r}")


# -- models and adapters --------------------------------------------------------------------------------------
def layer_names(model: nn.Module) -> set[str]:
    """Leaf names of the model's Linear / Conv1D layers (``query``, ``q_proj``, ``c_attn``, ...)."""
    from transformers.pytorch_utils import Conv1D

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def default_targets(model: nn.Module) -> list[str] | str:
    """The attention query/value projections under the model's own names, else ``"all-linear"``."""
    names = layer_names(model)
    for pair in DEFAULT_TARGETS:
        if names.issuperset(pair):
            return list(pair)
    return "all-linear"


def head_modules(model: nn.Module) -> list[str]:
    """Top-level classification-head modules (``classifier``, ``score``, DistilBERT's ``pre_classifier``)."""
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


def adapter_options(method: str, options: dict[str, Any] | None) -> tuple[type[AdapterConfig], dict[str, Any]]:
    """The config class of ``method`` and its fields: the method's fixed fields plus ``options``, checked.

    Raises ``RecipeError`` when an option contradicts a fixed field (``mtlora-icfm`` with ``structure=shim``)
    or names no field of the config class. ``r``, ``target_modules`` and ``modules_to_save`` are not options.
    """
    spec = method_spec(method)
    cls = METHODS[spec.config_method]
    fields = {f.name for f in dataclasses.fields(cls)} - {"r", "target_modules", "modules_to_save"}
    options = options or {}
    clash = {k: v for k, v in spec.fixed.items() if k in options and options[k] != v}
    if clash:
        key = next(iter(clash))
        raise RecipeError(f"method {method} means {key}={clash[key]!r}, but {key}={options[key]!r} was given; "
                          f"use --method {spec.config_method} with {key}={options[key]!r}, or drop the option")
    options = {**spec.fixed, **options}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields))
        raise RecipeError(f"{cls.__name__} has no field(s) {unknown}; --adapter-arg accepts: {valid}")
    return cls, options


def build_adapter_config(
    method: str,
    model: nn.Module,
    r: int,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> AdapterConfig | None:
    """The adapter config for ``method`` on ``model`` (``None`` for ``full`` / ``linear-probe``).

    Targets default to the query/value projections (``default_targets``); ``options`` are further fields
    of the method's config class, checked by name.
    """
    if method_spec(method).config_method is None:
        return None
    cls, options = adapter_options(method, options)
    try:
        return cls(r=r, target_modules=target_modules or default_targets(model),
                   modules_to_save=modules_to_save or None, **options)
    except (ConfigError, TypeError) as err:
        raise RecipeError(f"{method}: {err}") from None


def resolve_num_heads(options: RunOptions, texts: list[str] | None) -> RunOptions:
    """``num_heads=auto`` (HydraLoRA): the head count ``estimate_num_heads`` finds in the training texts."""
    if options.adapter_args.get("num_heads") != "auto":
        return options
    if not texts:
        raise RecipeError("num_heads=auto needs training texts to cluster; give a number instead")
    from peftlab.hydralora import estimate_num_heads

    n, _ = estimate_num_heads(texts, max_heads=8, seed=options.seed)
    print(f"num_heads=auto: estimate_num_heads found {n} cluster(s) in the training texts")
    return dataclasses.replace(options, adapter_args={**options.adapter_args, "num_heads": n})


def prepare_model(
    model: nn.Module, options: RunOptions, classification: bool, texts: list[str] | None = None
) -> nn.Module:
    """Put the method on ``model``: wrap it with an adapter, unfreeze all (``full``) or only the head.

    For classification the new head (``classifier`` / ``score``) is trained with the adapter
    (``modules_to_save``) and saved with it. ``texts`` (training inputs) serve ``num_heads=auto``.
    """
    options = resolve_num_heads(options, texts)
    heads = head_modules(model) if classification else []
    if classification and not heads and options.method != FULL:
        raise RecipeError(f"{type(model).__name__} has no classification head named one of {HEAD_NAMES}")
    if options.method == FULL:
        model.requires_grad_(True)
        return model
    if options.method == LINEAR_PROBE:
        model.requires_grad_(False)
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
        return model
    config = build_adapter_config(options.method, model, options.r, options.target_modules, heads,
                                  options.adapter_args)
    try:
        return get_adapter_model(model, config)
    except ValueError as err:  # targets matching nothing, r too large for a layer, ...
        raise RecipeError(str(err)) from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (adapters and head copies included)."""
    if isinstance(model, AdapterModel):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / io.CONFIG_NAME).is_file()


def read_run(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run_config.json`` of a run folder, or ``None``."""
    file = Path(path) / RUN_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RecipeError(f"{file} is not valid JSON; the run folder is damaged") from None
    return data if isinstance(data, dict) else None


def saved_run_options(path: str | os.PathLike) -> RunOptions | None:
    """The options a saved run was trained with (``None`` for a folder not written by a recipe)."""
    data = read_run(path)
    return RunOptions.from_dict(data["options"]) if data and "options" in data else None


def base_model_name(adapter_dir: str | os.PathLike, model: str | None = None) -> str:
    """The base model of a saved adapter: ``model`` if given, else the run's ``--model``, else the adapter config's."""
    if model:
        return model
    options = saved_run_options(adapter_dir)
    if options is not None and options.model:
        return options.model
    if is_adapter_dir(adapter_dir):
        name = io.read_json(Path(adapter_dir) / io.CONFIG_NAME).get("base_model_name_or_path")
        if name:
            return str(name)
    raise RecipeError(f"{adapter_dir} does not record its base model; pass --model")


# -- the output folder ------------------------------------------------------------------------------------------
def _describe(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={options.get(k)}" for k in ("task", "method", "model", "data", "r", "seed"))


def check_output_dir(options: RunOptions, kind: str = "train") -> str | None:
    """Check that the run may use ``options.output_dir``; return the checkpoint to resume from.

    Read-only (safe on every rank of a distributed run). An existing folder is refused unless it is
    empty, or ``overwrite`` is set and it holds a peftlab run (a folder peftlab did not write is never
    deleted), or ``resume`` is set and it holds the same run with a checkpoint.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(options.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--output-dir {out} exists and is a file, not a folder")
    empty = not out.exists() or not any(out.iterdir())
    if options.resume and kind != "train":
        raise RecipeError(f"--resume is not supported by peftlab {kind}")
    if empty:
        if options.resume:
            raise RecipeError(f"--resume: {out} holds no run to resume; start it without --resume")
        return None
    previous = read_run(out)
    if options.resume:
        if previous is None or "options" not in previous:
            raise RecipeError(f"--resume: {out} holds no peftlab run (no {RUN_FILE}); nothing to resume")
        old, new = previous["options"], options.to_dict()
        diffs = [k for k in new if k not in NOT_IDENTITY and old.get(k) != new[k]]
        if diffs:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diffs)
            raise RecipeError(f"--resume: {out} holds a different run ({changes}); resume it with its own options")
        checkpoint = get_last_checkpoint(str(out))
        if checkpoint is None:
            raise RecipeError(f"--resume: {out} has no checkpoint-* folder yet; rerun with --overwrite to start again")
        return checkpoint
    if previous is None:
        raise RecipeError(
            f"--output-dir {out} is not empty and holds no peftlab run; choose another folder "
            "(peftlab never deletes a folder it did not write, even with --overwrite)"
        )
    if not options.overwrite:
        same = previous.get("options", {}).get("method") == options.method and previous.get("kind") == kind
        what = "an earlier result of this method" if same else "a different run"
        raise RecipeError(
            f"--output-dir {out} already holds {what} ({_describe(previous.get('options', {}))}); pass --overwrite "
            "to replace it, --resume to continue it, or choose another --output-dir"
        )
    return None


def start_output_dir(
    options: RunOptions, kind: str = "train", main_process: bool = True, extra: dict[str, Any] | None = None
) -> Path:
    """Clear the folder (when overwriting) and write ``run_config.json`` (+ ``extra``); only on the main process."""
    out = Path(options.output_dir)
    if main_process:
        if options.overwrite and out.is_dir() and read_run(out) is not None:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"kind": kind, "peftlab_version": __version__, "options": options.to_dict(), **(extra or {})}
        if options.resume and (previous := read_run(out)):
            record["resumed"] = [*previous.get("resumed", []), time.strftime("%Y-%m-%d %H:%M:%S")]
        io.atomic_write_json(out / RUN_FILE, record)
    return out


# -- training ---------------------------------------------------------------------------------------------------
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def total_steps(options: RunOptions, num_train: int) -> int:
    """Optimizer steps of the whole run (for capping the evaluation interval)."""
    if options.max_steps:
        return options.max_steps
    per_epoch = math.ceil(num_train / (options.batch_size * world_size()))
    return max(1, math.ceil(per_epoch * options.epochs))


def training_arguments(options: RunOptions, num_train: int, metric: str, greater_is_better: bool, **extra: Any):
    """HF ``TrainingArguments``: linear schedule with warm-up, eval + checkpoint every ``eval_steps``
    (capped at the run's length), the best checkpoint kept and restored at the end, seeded."""
    from transformers import TrainingArguments

    every = min(options.eval_steps, total_steps(options, num_train))
    if world_size() > 1 and not torch.cuda.is_available():  # torchrun on CPU: HF needs use_cpu for gloo DDP
        extra = {"use_cpu": True, "ddp_backend": "gloo", **extra}
    return TrainingArguments(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.eval_batch_size,
        learning_rate=options.lr,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        warmup_steps=options.warmup,
        weight_decay=options.weight_decay,
        lr_scheduler_type="linear",
        eval_strategy="steps",
        eval_steps=every,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=greater_is_better,
        logging_steps=max(1, min(10, every)),
        report_to="none",
        seed=options.seed,
        data_seed=options.seed,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding, same data
        disable_tqdm=False,
        **{"dataloader_pin_memory": torch.cuda.is_available(), **extra},
    )


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on GPU, else the process RSS (sampled)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if torch.cuda.is_available() else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        if self.kind == "rss":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak_bytes = torch.cuda.max_memory_allocated()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No ``Map: 100%`` bars from ``datasets`` (the Trainer's progress bar stays)."""
    from datasets.utils import logging as ds_logging

    enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            ds_logging.enable_progress_bar()


def resumed_from_step(checkpoint: str | None) -> int:
    """The global step stored in a checkpoint folder (0 without one)."""
    if checkpoint is None:
        return 0
    state = Path(checkpoint) / "trainer_state.json"
    return int(json.loads(state.read_text()).get("global_step", 0)) if state.is_file() else 0


def run_training(trainer: Any, checkpoint: str | None) -> dict[str, Any]:
    """``trainer.train()`` (resumed from ``checkpoint``), timed, with peak memory; the best model is loaded after."""
    start_step = resumed_from_step(checkpoint)
    with PeakMemory() as memory:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    steps = max(1, result.global_step - start_step)
    runtime = float(result.metrics.get("train_runtime", 0.0))
    return {
        "global_step": result.global_step,
        "resumed_from_step": start_step,
        "steps_this_run": result.global_step - start_step,
        "train_runtime_s": runtime,
        "seconds_per_step": runtime / steps,
        "train_loss": result.metrics.get("train_loss"),
        "peak_memory_mb": round(memory.peak_mb, 1),
        "peak_memory_kind": memory.kind,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_validation_metric": trainer.state.best_metric,
    }


def strip_prefix(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``{"test_accuracy": x, "test_runtime": ...}`` → ``{"accuracy": x}`` (timing entries dropped)."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "preparation_time")
    return {k[len(prefix) + 1:]: v for k, v in metrics.items() if k.startswith(prefix + "_") and not k.endswith(skip)}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a note) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("peftlab: matplotlib is not installed, so no PNG is written (pip install 'peftlab[plot]')", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(log_history: list[dict[str, Any]], path: str | os.PathLike, metric: str) -> None:
    """Training loss and the validation metric against the step, as a PNG (matplotlib, Agg)."""
    plt = pyplot()
    if plt is None:
        return

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e[f"eval_{metric}"]) for e in log_history if f"eval_{metric}" in e]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax1.plot(*zip(*train, strict=True), label="train loss")
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    if evals:
        ax2.plot(*zip(*evals, strict=True), marker="o", color="tab:orange")
    ax2.set(xlabel="step", ylabel=metric, title=f"validation {metric}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish_run(trainer: Any, out: Path, metrics: dict[str, Any], metric: str, keep_checkpoints: bool = True) -> None:
    """Write the adapter (or full model) + tokenizer, ``metrics.json`` and the training curve (main process)."""
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    trainer.save_state()
    io.atomic_write_json(out / METRICS_FILE, _jsonable(metrics))
    plot_training_curve(trainer.state.log_history, out / CURVE_FILE, metric)
    if not keep_checkpoints:
        for checkpoint in out.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def log(message: str, enabled: bool = True) -> None:
    """Print one progress line (main process only)."""
    if enabled:
        print(message, flush=True)


def select(data: Any, limit: int | None, seed: int) -> Any:
    """At most ``limit`` rows of a ``datasets.Dataset``, a seeded random subset (all rows without a limit)."""
    if limit is None or limit >= len(data):
        return data
    return data.shuffle(seed=seed).select(range(limit))


def with_length(data: Any, sort: bool = False) -> Any:
    """Add a ``length`` column (tokens per row) for length-grouped batches; ``sort`` orders the rows by it.

    Sorting an evaluation set only removes padding: the metrics do not depend on the order.
    """
    with quiet_datasets():
        data = data.map(lambda batch: {"length": [len(ids) for ids in batch["input_ids"]]}, batched=True)
    return data.select(sorted(range(len(data)), key=data["length"].__getitem__)) if sort else data


def fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


LoadFn = Callable[..., tuple[nn.Module, Any]]
