"""Training a recipe's model with HF ``Trainer``: arguments, the run itself, peak memory, data selection, outputs.

``training_arguments`` builds HF ``TrainingArguments`` (evaluate and save every N steps, keep the best
checkpoint, ``load_best_model_at_end``, seeded), so ``torchrun`` / ``accelerate launch`` work unchanged.
``run_training`` times the run and measures its peak memory; resumed at a checkpoint that already holds the
last step (a run killed during its final save) it restores that state instead of training. ``finish_run``
writes the adapter (or model), ``training_curve.png`` and, last, ``metrics.json`` into the run folder.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from peftlab.recipes.options import RunOptions
from peftlab.recipes.rundir import CURVE_FILE, TRAINER_STATE, remove_checkpoints, write_metrics


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def total_steps(options: RunOptions, num_train: int) -> int:
    """Optimizer steps of the whole run (for capping the evaluation interval)."""
    if options.max_steps:
        return options.max_steps
    batches = math.ceil(num_train / (options.batch_size * world_size()))
    per_epoch = max(1, batches // options.gradient_accumulation_steps)  # HF's updates per epoch
    return max(1, math.ceil(per_epoch * options.epochs))


def training_arguments(options: RunOptions, num_train: int, metric: str, greater_is_better: bool, **extra: Any):
    """HF ``TrainingArguments``: linear schedule with warm-up, eval + checkpoint every ``eval_steps``
    (capped at the run's length), the best checkpoint kept and restored at the end, seeded; mixed precision,
    gradient accumulation and checkpointing and ``torch_compile`` from :func:`peftlab.recipes.scale.trainer_kwargs`."""
    from transformers import TrainingArguments

    from peftlab.recipes.scale import trainer_kwargs

    every = min(options.eval_steps, total_steps(options, num_train))
    extra = {**trainer_kwargs(options), **extra}  # mixed precision, accumulation, checkpointing, compile
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
        report_to=[options.report_to] if options.report_to not in (None, "none", "tensorboard") else "none",
        seed=options.seed,
        data_seed=options.seed,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding, same data
        disable_tqdm=False,
        **{"dataloader_pin_memory": torch.cuda.is_available(), **extra},
    )


LOGS_DIR = "logs"  # TensorBoard event files of a run, in its output folder


_ADDED_CALLBACKS: list[Any] = []  # callbacks of the runs started inside ``with added_callbacks(...)``


@contextmanager
def added_callbacks(*callbacks: Any) -> Iterator[None]:
    """Give the text recipes' Trainers ``callbacks`` too, for the runs started inside the block (``compare
    --tune`` reports each evaluation of a trial to its pruner this way)."""
    _ADDED_CALLBACKS.extend(callbacks)
    try:
        yield
    finally:
        del _ADDED_CALLBACKS[len(_ADDED_CALLBACKS) - len(callbacks):]


def tracking_callbacks(options: RunOptions) -> list[Any]:
    """HF Trainer callbacks for ``--report-to tensorboard``: HF's own ``TensorBoardCallback``, writing into
    ``<output-dir>/logs`` (HF's default is a new time-stamped folder per run). Other trackers go through
    ``TrainingArguments.report_to`` (see :func:`training_arguments`). Callbacks given by :func:`added_callbacks`
    come first."""
    if options.report_to != "tensorboard":
        return list(_ADDED_CALLBACKS)
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(Path(options.output_dir) / LOGS_DIR)
    return [*_ADDED_CALLBACKS, callback]


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


def resumed_from_step(checkpoint: str | None) -> int:
    """The global step stored in a checkpoint folder (0 without one)."""
    if checkpoint is None:
        return 0
    state = Path(checkpoint) / TRAINER_STATE
    return int(json.loads(state.read_text()).get("global_step", 0)) if state.is_file() else 0


def planned_steps(trainer: Any) -> int:
    """The optimizer steps ``trainer.train()`` runs in all (HF's rule: max_steps, else epochs x updates per epoch)."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = max(len(trainer.get_train_dataloader()) // args.gradient_accumulation_steps, 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def run_training(trainer: Any, checkpoint: str | None) -> dict[str, Any]:
    """``trainer.train()`` (resumed from ``checkpoint``), timed, with peak memory; the best model is loaded after.

    A checkpoint at the last planned step means training had ended when the run stopped: its state is restored
    and nothing is trained (HF, resumed there in the middle of an epoch, would train one step too many).
    """
    start_step = resumed_from_step(checkpoint)
    done = checkpoint is not None and start_step >= planned_steps(trainer)
    with PeakMemory() as memory:
        if done:
            restore_finished_training(trainer, checkpoint)
            global_step, runtime, loss = trainer.state.global_step, 0.0, logged_train_loss(trainer.state.log_history)
        else:
            result = trainer.train(resume_from_checkpoint=checkpoint)
            global_step, runtime = result.global_step, float(result.metrics.get("train_runtime", 0.0))
            loss = result.metrics.get("train_loss")
    steps = global_step - start_step
    return {
        "global_step": global_step,
        "resumed_from_step": start_step,
        "steps_this_run": steps,
        "train_runtime_s": runtime,
        "seconds_per_step": runtime / steps if steps > 0 else None,
        "train_loss": loss,
        "peak_memory_mb": round(memory.peak_mb, 1),
        "peak_memory_kind": memory.kind,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_validation_metric": trainer.state.best_metric,
    }


def restore_finished_training(trainer: Any, checkpoint: str) -> None:
    """What ``trainer.train()`` leaves at its end, from a checkpoint at the last step: its weights and state, then
    (``load_best_model_at_end``) the best checkpoint's weights, found in this run folder as HF finds it."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
    if state.best_global_step:
        best = Path(trainer.args.output_dir) / f"checkpoint-{state.best_global_step}"
        state.best_model_checkpoint = str(best) if best.is_dir() else None
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        trainer._load_best_model()


def logged_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The mean training loss over the logged steps (each logged loss is the mean over its logging interval)."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total, last = total + entry["loss"] * (entry["step"] - last), entry["step"]
    return total / last if last else None


def speed(training: dict[str, Any]) -> str:
    """``0.42 s/step`` of a run's training (from ``run_training``), or that this run trained no step."""
    per_step = training["seconds_per_step"]
    return "no step trained in this run" if per_step is None else f"{per_step:.2f} s/step"


def strip_prefix(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``{"test_accuracy": x, "test_runtime": ...}`` → ``{"accuracy": x}`` (timing entries dropped)."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "preparation_time")
    return {k[len(prefix) + 1:]: v for k, v in metrics.items() if k.startswith(prefix + "_") and not k.endswith(skip)}


def select(data: Any, limit: int | None, seed: int) -> Any:
    """At most ``limit`` rows of a ``datasets.Dataset``, a seeded random subset (all rows without a limit)."""
    if limit is None or limit >= len(data):
        return data
    return data.shuffle(seed=seed).select(range(limit))


def split_rows(data: Any, split: str) -> Any:
    """The rows of ``split`` of a ``DatasetDict``; :data:`~peftlab.recipes.options.WHOLE`: all its splits together
    (``peftlab eval --data FILE`` scores the whole file)."""
    from peftlab.recipes.options import WHOLE

    if split != WHOLE:
        return data[split]
    import datasets as hf

    return hf.concatenate_datasets([part for part in data.values() if len(part)])


def with_length(data: Any, sort: bool = False) -> Any:
    """Add a ``length`` column (tokens per row) for length-grouped batches; ``sort`` orders the rows by it.

    Sorting an evaluation set only removes padding: the metrics do not depend on the order.
    """
    with quiet_datasets():
        data = data.map(lambda batch: {"length": [len(ids) for ids in batch["input_ids"]]}, batched=True)
    return data.select(sorted(range(len(data)), key=data["length"].__getitem__)) if sort else data


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
    """Write the adapter (or full model) + tokenizer, the training curve and, last, ``metrics.json`` (main process):
    a run folder with ``metrics.json`` is finished. Without ``keep_checkpoints`` the checkpoints are removed after."""
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    trainer.save_state()
    plot_training_curve(trainer.state.log_history, out / CURVE_FILE, metric)
    write_metrics(out, metrics)
    if not keep_checkpoints:
        remove_checkpoints(out)


def log(message: str, enabled: bool = True) -> None:
    """Print one progress line (main process only: ``enabled``, and ``$RANK`` 0 in a distributed run)."""
    from peftlab.recipes.rundir import is_main_process

    if enabled and is_main_process():
        print(message, flush=True)


def fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


