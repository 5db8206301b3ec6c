"""One image run, as a template: prepare → score the base → adapters → fit → score again → write the run folder.

A recipe (``subject_driven``, ``controllable``) fills in a :class:`PreparedRun`: what it has checked and loaded
before the run folder is touched (its ``prepare``), how it scores samples, and what it trains besides the
method's adapters (:class:`Objective`). :func:`train_prepared` does the rest, the same for every image task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.recipes.image.training import Batch, add_adapters, finish_image_run, fit, saved_metrics, summary
from peftlab.recipes.options import RunOptions
from peftlab.recipes.rundir import is_main_process, start_output_dir
from peftlab.recipes.scale import unet_training
from peftlab.recipes.test_items import ITEMS, ITEMS_FILE, ItemScores, item_key, read_items, write_items
from peftlab.recipes.training import log

# (values, skipped with the reason, the samples, per-sample values of the metrics that are a mean over samples)
Scores = tuple[dict[str, float], dict[str, str], list[Any], dict[str, list[float]]]


@dataclass
class Objective:
    """What a run trains: ``sample()`` draws a batch; ``modules`` train with the adapters (the condition encoder),
    ``hook`` is the condition hook that :func:`fit` feeds (cleared after training); ``metrics`` go to
    ``metrics.json``."""

    sample: Callable[[], Batch]
    modules: list[nn.Module] = field(default_factory=list)
    hook: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedRun:
    """A prepared image run: the frozen base pipeline, the image size, and the prompts the text encoder's adapters
    are built for. A recipe subclasses it with its data and the three steps below."""

    pipe: Any
    size: int
    prompts: list[str]

    def metrics(self, options: RunOptions) -> dict[str, Any]:
        """The recipe's entries of ``metrics.json`` (its main ``metric``, the data it trained on)."""
        raise NotImplementedError

    def score(self, options: RunOptions, trained: bool) -> Scores:
        """Samples of the pipeline as it is now (the base, then the trained run; same seeds) and their scores."""
        raise NotImplementedError

    def objective(self, options: RunOptions, generator: torch.Generator) -> tuple[Objective, str]:
        """(the objective, what it trains on, for the log line), built once the adapters are on the pipeline."""
        raise NotImplementedError

    def sample_prompts(self, options: RunOptions) -> list[str]:
        """The prompt of each scored sample, in order (what a sample's ``test_items.jsonl`` key is made from)."""
        raise NotImplementedError


def train_prepared(run: PreparedRun, options: RunOptions, checkpoint: str | None,
                   summary_keys: tuple[str, ...]) -> dict[str, Any]:
    """Train ``options.method`` on a prepared run (the seed set before ``prepare``); returns the metrics, also
    written to ``metrics.json`` with the adapters, samples and loss curve."""
    from accelerate.utils import set_seed

    before, *_ = run.score(options, trained=False)
    out = start_output_dir(options, main_process=is_main_process())
    set_seed(options.seed)
    models = add_adapters(run.pipe, options, options.train_text_encoder, run.prompts)
    generator = torch.Generator().manual_seed(options.seed)
    objective, what = run.objective(options, generator)
    log(f"training {options.method}{' + a condition encoder' if objective.modules else ''} on {what}, "
        f"{options.max_steps} steps")
    with unet_training(run.pipe, models, options):  # --gradient-checkpointing, --torch-compile
        training = fit(run.pipe, [m.base_model for m in models.values()] + objective.modules, objective.sample,
                       options, hook=objective.hook, out=out, checkpoint=checkpoint, generator=generator)
    if objective.hook is not None:
        objective.hook.control = None
    after, skipped, samples, per_sample = run.score(options, trained=True)
    metrics = {
        "task": options.task, "method": options.method, "model": options.model, "lr": options.lr,
        "num_eval_images": len(samples), **run.metrics(options), options.score_split: after, "before": before,
        "skipped": skipped,
        **objective.metrics,
        **{k: v for k, v in training.items() if k != "losses"},
    }
    if metrics["metric"] in per_sample and is_main_process():  # the main metric is a mean over the samples
        items = ItemScores("mean", [{"key": item_key(i, prompt), "value": v} for i, (prompt, v) in
                                    enumerate(zip(run.sample_prompts(options), per_sample[metrics["metric"]],
                                                  strict=True))])
        metrics["test_items"] = write_items(out / ITEMS_FILE, items)
    finish_image_run(run.pipe, out, metrics, samples, training["losses"], options.keep_checkpoints)
    log(f"{options.task} {options.method}: {summary(metrics, summary_keys)}; {training['trainable_params']:,} "
        f"trainable parameters, {training['seconds_per_step']:.3f} s/step; wrote {out}")
    return metrics


def evaluate(folder: Any, options: RunOptions, split: str, max_samples: int | None) -> dict[str, Any]:
    """``peftlab eval`` of an image run: the metrics written at the end of training (and its per-sample scores)."""
    return {**saved_metrics(folder), ITEMS: read_items(folder)}
