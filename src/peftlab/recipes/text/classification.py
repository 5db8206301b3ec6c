"""Sequence classification and regression (GLUE-style): data → model → adapter → ``peftlab.Trainer`` → metrics.

Data come from ``peftlab.data.load_dataset`` (named offline sets, CSV/TSV/JSON/JSONL/parquet files, Hub
names) with fixed, seeded train/validation/test splits. The model is ``AutoModelForSequenceClassification``
with a new head, which trains with the adapter (``modules_to_save``). Metrics are ``peftlab.metrics``'
(scikit-learn / scipy): a GLUE task name (``glue_task``) selects its metrics (Matthews for CoLA,
accuracy + F1 for MRPC/QQP, Pearson + Spearman for STS-B, accuracy otherwise); other data report
accuracy + macro F1, or Pearson + Spearman for a real-valued label. Model selection uses the validation
split; the reported numbers are on the held-out test split. Data with a ``domain`` column (``sentiment-4domains``, a
file with that column) also report accuracy (and macro F1) per domain: ``accuracy_by_domain``.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab import files
from peftlab.errors import PeftlabError, RecipeError
from peftlab.layers import CLASSIFIER_HEADS
from peftlab.metrics import GLUE_TASKS, metrics_by_group, trainer_compute_metrics
from peftlab.model import AdapterModel
from peftlab.recipes.adapters import count_parameters, prepare_model
from peftlab.recipes.options import RunOptions
from peftlab.recipes.rundir import (
    CURVE_FILE,
    METRICS_FILE,
    base_model_name,
    is_adapter_dir,
    owns_output_dir,
    read_run,
    start_output_dir,
)
from peftlab.recipes.test_items import ITEMS, ITEMS_FILE, ItemScores, item_key, write_items
from peftlab.recipes.training import (
    finish_run,
    fmt,
    log,
    quiet_datasets,
    run_training,
    select,
    speed,
    split_rows,
    strip_prefix,
    tracking_callbacks,
    training_arguments,
    with_length,
)


# -- data --------------------------------------------------------------------------------------------------------
def _text_columns(options: RunOptions) -> str | list[str] | None:
    if options.text_column:
        columns = [c.strip() for c in options.text_column.split(",") if c.strip()]
        return columns[0] if len(columns) == 1 else columns
    if options.glue_task:
        return list(GLUE_TASKS[options.glue_task].text_columns)
    return None


RARE_LABEL = 50  # a label with at most 1/50 of the rows of the most common one needs --num-labels to train


def load_data(options: RunOptions, model_labels: list[str] | None = None, num_model_labels: int | None = None):
    """The data as a ``DatasetDict`` (``text`` [, ``text_pair``], ``label``) and its label names (``None``: regression).

    ``model_labels`` (the labels a trained model knows) maps the data's labels onto the model's by name (integer
    labels for named ones: by index, see :func:`map_to_model_labels`); ``num_model_labels`` / ``options.num_labels``
    bound the label values. Out-of-range labels, unknown label names and empty splits raise ``RecipeError``, and so
    does, for training without ``--num-labels``, a label with at most 1/50 of the rows of the most common one (a
    stray value, e.g. one ``7`` in a 0/1 column, would otherwise add a class); ``--num-labels`` confirms such a class.
    """
    import datasets as hf

    from peftlab.data import label_names, load_dataset

    if options.glue_task is not None and options.glue_task not in GLUE_TASKS:
        raise RecipeError(f"unknown GLUE task {options.glue_task!r}; known: {', '.join(GLUE_TASKS)}")
    data = load_dataset(options.data, text_column=_text_columns(options), label_column=options.label_column,
                        seed=options.split_seed)
    names = label_names(data)
    if not len(data["train"]) and not model_labels:
        raise RecipeError(f"{options.data}: the training split is empty; the data set needs more rows")
    limit = num_model_labels or options.num_labels
    if names is None:
        return data, None
    if model_labels is None and limit is None:  # a stray value must not silently become a class of its own
        counts = Counter(label for split in data.values() for label in split["label"])
        rare = [i for i in range(len(names)) if 0 < counts[i] * RARE_LABEL <= max(counts.values())]
        if rare:
            table = ", ".join(f"{name!r}: {counts[i]}" for i, name in enumerate(names))
            classes = max(int(n) for n in names) + 1 if all(_is_int(n) for n in names) else len(names)
            raise RecipeError(
                f"{options.data}: label {names[rare[0]]!r} occurs {counts[rare[0]]} time(s) in {counts.total()} rows "
                f"(label counts {table}), so it would silently become a class of its own; fix the data, or pass "
                f"--num-labels {classes} if it is a real class"
            )
    mapping: list[int] | None = None
    if model_labels is not None and names != model_labels:
        mapping = map_to_model_labels(str(options.data), names, model_labels)
        names = list(model_labels)
    elif limit is not None:
        if all(_is_int(n) for n in names):  # integer labels keep their values 0..K-1
            values = [int(n) for n in names]
            bad = [v for v in values if not 0 <= v < limit]
            if bad:
                raise RecipeError(
                    f"{options.data}: label value(s) {bad[:5]} out of range for {limit} classes (labels must be "
                    f"0..{limit - 1})"
                )
            mapping, names = values, [str(i) for i in range(limit)]
        elif len(names) > limit:
            raise RecipeError(
                f"{options.data}: {len(names)} distinct labels {names[:10]} but only {limit} classes; labels out of "
                "range (check --num-labels and --label-column)"
            )
    if mapping is not None:
        with quiet_datasets():
            if mapping != list(range(len(mapping))):
                data = data.cast_column("label", hf.Value("int64"))
                data = data.map(lambda b: {"label": [mapping[v] for v in b["label"]]}, batched=True)
            data = data.cast_column("label", hf.ClassLabel(names=names))
    return data, names


def map_to_model_labels(data: str, names: list[str], model_labels: list[str]) -> list[int]:
    """The model's class index of each of the data's label names: by name, or, when the data's labels are all
    integers and the model's labels are names (none an integer), integer k means the model's k-th label
    (0 → ``model_labels[0]``); anything else is a RecipeError that lists the model's labels."""
    unknown = [n for n in names if n not in model_labels]
    if not unknown:
        return [model_labels.index(n) for n in names]
    indices = "" if any(_is_int(m) for m in model_labels) else f", or their indices 0..{len(model_labels) - 1}"
    if not indices or not all(_is_int(n) for n in names):
        raise RecipeError(f"{data}: label value(s) {unknown[:5]} are not labels the model was trained on: use its "
                          f"labels {model_labels}{indices}")
    bad = [n for n in names if not 0 <= int(n) < len(model_labels)]
    if bad:
        raise RecipeError(f"{data}: integer label(s) {bad[:5]} out of range: integer labels index the model's labels "
                          f"{model_labels} (0 = {model_labels[0]!r}), so they must be 0..{len(model_labels) - 1}")
    return [int(n) for n in names]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


GROUP_COLUMN = "domain"  # a data column whose groups get metrics of their own (``accuracy_by_domain``)


def tokenize(data, tokenizer, max_length: int, sort: bool = False):
    """Token ids (truncated to ``max_length``; padding is per batch), ``label``, ``length`` (``sort``: by length) and
    the data's :data:`GROUP_COLUMN` when it has one (take it off with :func:`pop_groups` before the Trainer sees it).

    The result's fingerprint is named from the rows' fingerprint, the tokenizer's name, class and vocabulary size and
    ``max_length``: ``datasets`` would otherwise pickle the whole tokenizer to hash the function (~3 s per split for
    a 30k-token vocabulary on a 2-core machine).
    """
    import hashlib

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        return tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)

    key = (f"{data._fingerprint} {type(tokenizer).__name__} {tokenizer.name_or_path} {len(tokenizer)} {max_length} "
           f"{GROUP_COLUMN}")
    with quiet_datasets():
        encoded = data.map(encode, batched=True, remove_columns=[c for c in data.column_names
                                                                 if c not in ("label", GROUP_COLUMN)],
                           new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])
    return with_length(encoded, sort=sort)


def pop_groups(rows) -> tuple[Any, list[str] | None]:
    """(the tokenised ``rows`` without their :data:`GROUP_COLUMN`, that column's values in the rows' order, or
    ``None`` when the data have none)."""
    if GROUP_COLUMN not in rows.column_names:
        return rows, None
    return rows.remove_columns(GROUP_COLUMN), list(rows[GROUP_COLUMN])


def group_scores(seen: dict[str, Any], groups: list[str] | None, task: str | None) -> dict[str, dict[str, float]]:
    """The last evaluation's metrics per group (``accuracy_by_domain``, ...; :func:`peftlab.metrics.metrics_by_group`)
    when the scored rows have groups, else nothing."""
    if groups is None or len(seen.get("labels", ())) != len(groups):
        return {}
    return metrics_by_group(seen["predictions"], seen["labels"], groups, task, GROUP_COLUMN)


def metric_task(options: RunOptions, regression: bool) -> str | None:
    """The ``peftlab.metrics`` task: the GLUE task, ``"stsb"`` (Pearson/Spearman) for regression, else ``None``."""
    return options.glue_task or ("stsb" if regression else None)


def main_metric(options: RunOptions, regression: bool) -> str:
    task = metric_task(options, regression)
    return GLUE_TASKS[task].metrics[0] if task else "accuracy"


ITEM_AGGREGATES = {"accuracy": "mean", "matthews_correlation": "matthews", "pearson": "pearson"}


def classification_items(seen: dict[str, Any], rows, metric: str) -> ItemScores | None:
    """Per-item results of the last evaluation (``seen``, filled by ``trainer_compute_metrics``) on the tokenised
    ``rows``, keyed by their token ids; ``None`` for a main metric without per-item statistics (F1)."""
    aggregate = ITEM_AGGREGATES.get(metric)
    if aggregate is None or len(seen.get("labels", ())) != len(rows):
        return None
    items = []
    for i, (ids, label, prediction) in enumerate(zip(rows["input_ids"], seen["labels"], seen["predictions"],
                                                     strict=True)):
        item = {"key": item_key(i, ids), "label": label.item(), "prediction": prediction.item()}
        if aggregate == "mean":
            item["value"] = int(label == prediction)
        items.append(item)
    return ItemScores(aggregate, items)


# -- training ----------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """A classification run before training: the data, the model with the method, the ``TrainingArguments``."""

    model: Any
    tokenizer: Any
    names: list[str] | None  # label names (``None``: regression)
    regression: bool
    train_set: Any
    val_set: Any
    test_set: Any
    metric: str
    args: Any
    groups: list[str] | None = None  # the scored rows' domains (GROUP_COLUMN), in test_set's order


def setup(options: RunOptions) -> Setup:
    """Data, the model with ``options.method`` and the ``TrainingArguments`` (what :func:`train` runs, and what
    :func:`peftlab.recipes.plan.plan` reports)."""
    from transformers import set_seed

    from peftlab.base_models import load_classifier
    from peftlab.recipes.scale import load_kwargs

    data, names = load_data(options)
    regression = names is None
    num_labels = 1 if regression else len(names)
    set_seed(options.seed)  # the new head and the adapter are initialised from this seed
    model, tokenizer = load_classifier(options.model, num_labels, label_names=names, **load_kwargs(options))
    if regression:
        model.config.problem_type = "regression"
    model = prepare_model(model, options, classification=True, texts=lambda: list(data["train"]["text"]))
    train_set, _ = pop_groups(tokenize(select(data["train"], options.max_train_samples, options.split_seed), tokenizer,
                                       options.max_length))
    val_set, groups = pop_groups(tokenize(select(data["validation"], options.max_eval_samples, options.split_seed),
                                          tokenizer, options.max_length, sort=True))
    if options.score_split == "validation":  # a trial of `compare --tune`: the test split is never read
        test_set = val_set
    else:
        test_set, groups = pop_groups(tokenize(select(data["test"], options.max_test_samples, options.split_seed),
                                               tokenizer, options.max_length, sort=True))
    metric = main_metric(options, regression)
    # average_tokens_across_devices off: a classifier's loss is a mean per device already (HF would multiply it by
    # the number of processes, so DDP / ZeRO runs would take N times the gradient of a one-process run)
    args = training_arguments(options, len(train_set), metric, greater_is_better=True,
                              label_smoothing_factor=options.label_smoothing, average_tokens_across_devices=False)
    return Setup(model, tokenizer, names, regression, train_set, val_set, test_set, metric, args, groups)


@owns_output_dir
def train(options: RunOptions, checkpoint: str | None) -> dict[str, Any]:
    """Train ``options.method`` on ``options.data``; write adapter, ``metrics.json`` and the curve; return metrics."""
    from transformers import DataCollatorWithPadding

    from peftlab.trainer import Trainer

    run = setup(options)
    model, tokenizer, names, args, metric = run.model, run.tokenizer, run.names, run.args, run.metric
    train_set, val_set, test_set = run.train_set, run.val_set, run.test_set
    trainable, total = count_parameters(model)
    seen: dict[str, Any] = {}  # the per-item results of the last evaluation, for test_items.jsonl
    with args.main_process_first(local=False):
        out = start_output_dir(options, main_process=args.process_index == 0, extra={"labels": names})
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=trainer_compute_metrics(metric_task(options, run.regression), seen),
        callbacks=tracking_callbacks(options),
    )
    main = trainer.is_world_process_zero()
    log(f"peftlab train: {options.method} (r={options.r}, lr={options.lr:g}) on {options.model}, {options.data}: "
        f"{len(train_set)} train / {len(val_set)} validation / {len(test_set)} test examples; trainable params "
        f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)", main)
    initial, split = None, options.score_split  # split: test, or validation for a trial of `compare --tune`
    if options.initial_eval and checkpoint is None:
        initial = strip_prefix(trainer.evaluate(test_set, metric_key_prefix=split), split)
        log(f"{split} {metric} before training (step 0): {fmt(initial[metric])}", main)
    if checkpoint:
        log(f"resuming from {checkpoint}", main)
    training = run_training(trainer, checkpoint)
    test = strip_prefix(trainer.evaluate(test_set, metric_key_prefix=split), split)
    test.update(group_scores(seen, run.groups, metric_task(options, run.regression)))
    metrics = {
        "task": "classification",
        "method": options.method,
        "model": options.model,
        "data": options.data,
        "metric": metric,
        "labels": names,
        "num_train": len(train_set),
        "num_validation": len(val_set),
        f"num_{split}": len(test_set),
        "trainable_params": trainable,
        "total_params": total,
        f"initial_{split}": initial,
        split: test,
        **training,
    }
    items = classification_items(seen, test_set, metric)
    if items is not None and main:
        metrics["test_items"] = write_items(out / ITEMS_FILE, items)
    finish_run(trainer, out, metrics, metric, options.keep_checkpoints)
    log(f"{split} {metric} after training: {fmt(test[metric])} (best validation {metric} "
        f"{fmt(training['best_validation_metric'])} at {Path(training['best_checkpoint'] or '-').name}; "
        f"{speed(training)})", main)
    what = "adapter" if isinstance(model, AdapterModel) else "model"
    log(f"wrote {out / METRICS_FILE}, {out / CURVE_FILE} and the {what} to {out}", main)
    return metrics


# -- loading a trained run ---------------------------------------------------------------------------------------
def _labels_from_tensors(path: Path) -> int | None:
    """The class count of a saved head (its last weight's rows), when the run did not record its labels."""
    tensors = files.load_tensors(path)
    keys = [k for k in tensors if k.split(".")[0] in CLASSIFIER_HEADS[1:] and k.endswith("weight")]
    return int(tensors[max(keys)].shape[0]) if keys else None


def saved_labels(path: str | os.PathLike) -> tuple[list[str] | None, int]:
    """(label names or ``None``, number of outputs) of a trained classification run or model folder."""
    path = Path(path)
    run = read_run(path) or {}
    if "labels" in run:
        names = run["labels"]
        return names, 1 if names is None else len(names)
    if is_adapter_dir(path):
        count = _labels_from_tensors(path)
        if count is None:
            raise RecipeError(f"{path}: cannot tell how many classes the adapter's head has; pass --num-labels")
        return None, count
    if (path / "config.json").is_file():
        config = files.read_json(path / "config.json")
        id2label = config.get("id2label") or {}
        names = [id2label[str(i)] for i in range(len(id2label))] if id2label else None
        return names, len(id2label) or int(config.get("num_labels", 2))
    raise RecipeError(f"{path} is neither a peftlab adapter folder nor a saved model")


def load_trained(path: str | os.PathLike, model_name: str | None = None, num_labels: int | None = None):
    """(model, tokenizer, label names) of a trained run: the base model with the adapter, or the saved model."""
    from peftlab.base_models import load_classifier

    names, count = saved_labels(path)
    count = num_labels or count
    if names is not None and len(names) != count:
        names = None
    if is_adapter_dir(path):
        model, tokenizer = load_classifier(base_model_name(path, model_name), count, label_names=names)
        try:
            return AdapterModel.from_pretrained(model, path), tokenizer, names
        except PeftlabError as err:
            raise RecipeError(str(err)) from None
    model, tokenizer = load_classifier(str(path), count, label_names=names)
    return model.eval(), tokenizer, names


def evaluate(adapter: str | os.PathLike, options: RunOptions, split: str, max_samples: int | None) -> dict[str, Any]:
    """Metrics of a trained run (adapter folder, or a full model folder) on a split of the data, with the
    run's options (``options``, see :func:`peftlab.recipes.evaluate`)."""
    from transformers import DataCollatorWithPadding, TrainingArguments

    from peftlab.trainer import Trainer

    names, count = saved_labels(adapter)
    data_set, data_names = load_data(options, model_labels=names, num_model_labels=count)
    if (data_names is None) != (count == 1):
        raise RecipeError(f"{options.data} has {'real-valued' if data_names is None else 'class'} labels but the "
                          f"model in {adapter} has {count} output(s)")
    net, tokenizer, _ = load_trained(adapter, options.model, count)
    limit = max_samples or {"test": options.max_test_samples, "validation": options.max_eval_samples}.get(split)
    rows, groups = pop_groups(tokenize(select(split_rows(data_set, split), limit, options.split_seed), tokenizer,
                                       options.max_length, sort=True))
    if not len(rows):
        raise RecipeError(f"{options.data}: the {split} split is empty")
    regression = data_names is None
    seen: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=options.eval_batch_size,
                                 report_to="none", disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available())
        trainer = Trainer(model=net, args=args, processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=trainer_compute_metrics(metric_task(options, regression), seen))
        metrics = strip_prefix(trainer.evaluate(rows, metric_key_prefix=split), split)
    metrics.update(group_scores(seen, groups, metric_task(options, regression)))
    metric = main_metric(options, regression)
    return {"task": "classification", "adapter": str(adapter), "model": options.model, "data": options.data,
            "split": split, "num_examples": len(rows), "metric": metric, split: metrics,
            ITEMS: classification_items(seen, rows, metric)}
