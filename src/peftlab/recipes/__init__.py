"""Training recipes: thin wiring of data → model → adapter → ``peftlab.Trainer`` → metrics, one module per task.

* ``text/``: ``classification`` (sequence classification / regression, GLUE metrics), ``causal_lm`` (instruction
  tuning, loss on the response only), ``data_to_text`` (E2E-style generation, BLEU / NIST / ROUGE-L),
  ``multiple_choice`` (log-likelihood scoring, evaluation only), and what they share: ``lm`` (prompt → response
  fine-tuning) and ``generation`` (decoding).
* ``image/``: ``subject_driven`` (DreamBooth with prior preservation) and ``controllable`` (a condition encoder +
  UNet adapters) on a diffusers pipeline, with their loop (``training``) and data (``data``).
* here, shared by every task: ``options`` (``RunOptions``), ``adapters`` (method names → adapted model),
  ``rundir`` (the run folder) and ``training`` (HF ``Trainer`` arguments, the run, peak memory, outputs).

``train(options)`` and ``evaluate(folder)`` pick the recipe by task. Every run writes ``metrics.json``, the
adapter (or model) and ``training_curve.png`` into its output folder. The commands built on the recipes
(``compare``, ``analyze``, ``serve``, ``saved``, ``generate``) are in :mod:`peftlab.commands`.

```python
from peftlab.recipes import RunOptions, train
metrics = train(RunOptions(model="minilm", data="movie-snippets", method="hra", r=8, output_dir="runs/hra"))
```
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from peftlab import files
from peftlab.errors import RecipeError
from peftlab.layers import CLASSIFIER_HEADS
from peftlab.recipes.adapters import method_spec, method_specs
from peftlab.recipes.options import IMAGE_TASKS, TASKS, WHOLE, RunOptions, check_split, eval_options
from peftlab.recipes.rundir import check_trained, is_adapter_dir, saved_run_options
from peftlab.recipes.test_items import ITEMS, write_items
from peftlab.recipes.text.multiple_choice import TASK as MULTIPLE_CHOICE  # an evaluation task only

MULTIPLE_CHOICE_OPTIONS = ("subjects", "shots", "continuation")

__all__ = [
    "TASKS", "RecipeError", "RunOptions", "evaluate", "method_spec", "method_specs", "recipe", "task_of",
    "train",
]


def recipe(task: str) -> ModuleType:
    """The recipe module of a task."""
    if task == "classification":
        from peftlab.recipes.text import classification as module
    elif task == "causal-lm":
        from peftlab.recipes.text import causal_lm as module
    elif task == "data-to-text":
        from peftlab.recipes.text import data_to_text as module
    elif task == "subject-driven":
        from peftlab.recipes.image import subject_driven as module
    elif task == "controllable":
        from peftlab.recipes.image import controllable as module
    elif task == "multiple-choice":  # evaluation only
        from peftlab.recipes.text import multiple_choice as module
    else:
        raise RecipeError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}, and multiple-choice for eval")
    return module


def train(options: RunOptions) -> dict[str, Any]:
    """Run the recipe of ``options.task``; returns its metrics (also written to ``metrics.json``)."""
    return recipe(options.task).train(options)


def task_of(folder: str | os.PathLike | None, task: str | None = None) -> str:
    """The task of a trained run: given, recorded in ``run_config.json``, or guessed from the saved files."""
    if task:
        return task
    if folder is None:
        raise RecipeError("no run folder given: pass one (--adapter), or --task multiple-choice to score a base model")
    folder = Path(folder)
    if not folder.is_dir():
        raise RecipeError(f"{folder} is not a folder; pass a run's output folder (adapter or model)")
    options = saved_run_options(folder)
    if options is not None:
        return options.task
    if is_adapter_dir(folder):
        heads = [k for k in files.load_tensors(folder) if k.split(".")[0] in CLASSIFIER_HEADS]
        return "classification" if heads else "causal-lm"
    if (folder / "config.json").is_file():
        archs = files.read_json(folder / "config.json").get("architectures") or [""]
        return "classification" if archs[0].endswith("SequenceClassification") else "causal-lm"
    raise RecipeError(f"{folder} holds neither an adapter ({files.CONFIG_NAME}) nor a model (config.json)")


def evaluate(
    folder: str | os.PathLike | None,
    task: str | None = None,
    split: str | None = None,
    max_samples: int | None = None,
    batch_size: int | None = None,
    items_file: str | os.PathLike | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """Metrics of a trained run (``peftlab eval``) on a split of its data (at most ``max_samples`` examples).

    The run is scored with the options it was trained with (``run_config.json``), so by default the numbers
    equal the ``test`` entry of its ``metrics.json``; ``changes`` (``model``, ``data``, ``text_column``,
    generation options, ...) and ``batch_size`` replace them, ``None`` keeps them. ``split`` defaults to
    ``test``; a data *file* given in ``changes`` without a ``split`` is scored whole (split :data:`WHOLE`),
    while a named data set keeps its seeded test split.
    ``task="multiple-choice"`` scores any model, a run's or a base model (``folder=None``, ``model=NAME``), on
    questions that are not its training data: see :func:`peftlab.recipes.text.multiple_choice.evaluate`.
    ``items_file`` (a ``.jsonl`` path) also gets the per-item scores, as a run's ``test_items.jsonl`` holds them
    (:mod:`peftlab.recipes.test_items`), and the result names it under ``test_items``.
    """
    metrics = _evaluate(folder, task, split, max_samples, batch_size, changes)
    items = metrics.pop(ITEMS, None)
    if items_file is not None:
        if items is None:
            raise RecipeError(f"the {metrics['task']} task (metric {metrics['metric']}) writes no per-item scores; "
                              "leave out --items")
        metrics["test_items"] = {**write_items(items_file, items), "file": str(items_file)}
    return metrics


def _evaluate(folder: str | os.PathLike | None, task: str | None, split: str | None, max_samples: int | None,
              batch_size: int | None, changes: dict[str, Any]) -> dict[str, Any]:
    if folder is None and task != MULTIPLE_CHOICE:
        raise RecipeError(f"the following arguments are required: --adapter (optional only with --task "
                          f"{MULTIPLE_CHOICE})")
    task = task_of(folder, task)
    if task == MULTIPLE_CHOICE:
        from peftlab.recipes.text import multiple_choice

        return multiple_choice.evaluate(folder, split=split or "test", max_samples=max_samples, batch_size=batch_size,
                                        **changes)
    own = [k for k in MULTIPLE_CHOICE_OPTIONS if changes.pop(k, None) is not None]
    if own:
        raise RecipeError(f"{', '.join('--' + k for k in own)} apply only to --task {MULTIPLE_CHOICE}")
    check_trained(folder)
    data = changes.get("data")
    whole = split is None and task not in IMAGE_TASKS and data is not None and Path(str(data)).expanduser().is_file()
    split = WHOLE if whole else split or "test"
    if not whole:
        check_split(split)
    options = eval_options(folder, task, saved_run_options(folder), {**changes, "eval_batch_size": batch_size})
    return recipe(task).evaluate(folder, options, split, max_samples)


def summary_line(metrics: dict[str, Any], folder: str | os.PathLike | None) -> str:
    """One line for the end of ``peftlab eval``: the main metric on the split."""
    split = metrics["split"]
    if metrics["task"] == MULTIPLE_CHOICE:
        from peftlab.recipes.text.multiple_choice import summary

        return summary(metrics, folder)
    value = metrics[split].get(metrics["metric"])
    if metrics["task"] in IMAGE_TASKS:  # scored on the images it generated; num_examples counts its training data
        count, what = metrics.get("num_eval_images"), "generated images"
    else:
        count, what = metrics.get("num_examples", metrics.get("num_mrs")), "examples"
    where = f"all of {metrics['data']}" if split == WHOLE else metrics["data"]
    return (f"{split} {metrics['metric']} of {folder} on {where}: "
            f"{f'{value:.4f}' if isinstance(value, float) else value}"
            + (f" ({count} {what})" if isinstance(count, int) else ""))
