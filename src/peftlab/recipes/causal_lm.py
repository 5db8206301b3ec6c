"""Causal-LM instruction tuning (MetaMathQA / HydraLoRA style): data → model → adapter → ``peftlab.Trainer`` → metrics.

Records are ``{instruction, input, output}`` (Alpaca layout; MetaMathQA ``{query, response}`` and GSM8K
``{question, answer}`` files are read as well). Each record becomes the prompt ``PROMPT`` (or
``PROMPT_WITH_INPUT``) followed by the response and the end-of-sequence token; the loss is on the
response only (prompt labels are -100). Evaluation: perplexity of the responses (from the loss) during
training, and after it the exact match of the final answer extracted from greedy generations
(``The answer is: X`` / ``#### X``, see ``peftlab.data.extract_answer``), overall and per ``task`` when
the data have a ``task`` column.

Data: ``arithmetic`` (default; seeded generated word problems), ``format``, ``sentiment`` (movie-snippet
instructions), ``mixture`` (all three, with a ``task`` column), or a JSON/JSONL file.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from peftlab.metrics import exact_match, perplexity
from peftlab.model import AdapterModel
from peftlab.recipes.common import (
    CURVE_FILE,
    METRICS_FILE,
    RecipeError,
    RunOptions,
    base_model_name,
    check_output_dir,
    count_parameters,
    finish_run,
    fmt,
    is_adapter_dir,
    log,
    prepare_model,
    quiet_datasets,
    run_training,
    saved_run_options,
    select,
    start_output_dir,
    strip_prefix,
    training_arguments,
    with_length,
)

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
GENERATED_SIZE = 2000  # rows generated for the named data sets (before the train/validation/test split)
NAMED_DATA = {
    "arithmetic": "seeded arithmetic word problems, answers 'The answer is: X'",
    "format": "reverse / upper-case / sort word lists",
    "sentiment": "movie-snippet sentiment as instructions (positive / negative)",
    "mixture": "arithmetic + format + sentiment with a `task` column (per-task exact match)",
}


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt (the MetaMathQA / HydraLoRA template) for one record."""
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT.format(instruction=instruction)


# -- data --------------------------------------------------------------------------------------------------------
def load_records(name: str, split_seed: int = 0):
    """A ``DatasetDict`` (train/validation/test) of ``{instruction, input, output[, task]}`` records."""
    import datasets as hf

    from peftlab.data import DataError, instruction_mixture, read_instructions, read_json_records, split_indices
    from peftlab.data.instructions import INSTRUCTION_TASKS

    if name == "mixture":
        records = instruction_mixture(GENERATED_SIZE // 3, seed=split_seed)
    elif name in INSTRUCTION_TASKS:
        records = INSTRUCTION_TASKS[name](GENERATED_SIZE, split_seed)
    elif Path(name).expanduser().is_file():
        path = Path(name).expanduser()
        if path.suffix.lower() not in (".json", ".jsonl", ".ndjson"):
            suffix = path.suffix or "a file without suffix"
            raise DataError(f"{path}: instruction data must be a .json or .jsonl file, not {suffix}")
        records = read_instructions(path)
        raw = read_json_records(path)
        if all(isinstance(r.get("task"), str) for r in raw):
            records = records.add_column("task", [r["task"] for r in raw])
    else:
        raise DataError(
            f"unknown instruction data {name!r}; known: {', '.join(NAMED_DATA)}, or a .json/.jsonl file with "
            "{instruction, input, output}, {query, response} or {question, answer} records"
        )
    if not len(records):
        raise DataError(f"{name}: no records")
    parts = split_indices(len(records), seed=split_seed, val_fraction=0.1, test_fraction=0.1,
                          stratify=records["task"] if "task" in records.column_names else None)
    return hf.DatasetDict({s: records.select(idx) for s, idx in parts.items()})


def eos_id(tokenizer) -> int:
    """The id that ends a response: EOS, else SEP (BERT-style vocabularies)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise RecipeError(f"{type(tokenizer).__name__} has no EOS or SEP token to end a response with")


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + response + EOS, with labels -100 on the prompt (loss on the response only).

    The two parts are tokenised separately, so the boundary is exact; the result is cut at ``max_length``.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos_id(tokenizer)]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_records(records, tokenizer, max_length: int, prompt_fn, response_fn):
    """Tokenise prompt/response pairs; rows whose response is cut off entirely are dropped."""

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        return encode_pair(tokenizer, prompt_fn(row), response_fn(row), max_length)

    with quiet_datasets():
        encoded = records.map(encode, remove_columns=records.column_names)
        kept = encoded.filter(lambda row: any(label != -100 for label in row["labels"]))
    if len(records) and not len(kept):
        raise RecipeError(f"every response is cut off at --max-length {max_length}; raise --max-length")
    return with_length(kept)


def record_prompt(row: dict[str, Any]) -> str:
    """The prompt of one ``{instruction, input, ...}`` record (what training, testing and ``num_heads=auto`` see)."""
    return format_prompt(row["instruction"], row.get("input") or "")


def _output(row: dict[str, Any]) -> str:
    return row["output"]


def collator(tokenizer):
    """Pads input ids with the pad token and labels with -100 (HF ``DataCollatorForSeq2Seq``, decoder-only use)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


class CausalLoss:
    """Next-token loss with label smoothing (HF ``LabelSmoother``, labels shifted) in training, plain in evaluation.

    ``transformers.Trainer``'s own ``label_smoothing_factor`` shifts labels only for models whose class name
    is a causal LM, which an ``AdapterModel`` wrapper is not; this ``compute_loss_func`` always shifts.
    """

    def __init__(self, model: torch.nn.Module, epsilon: float) -> None:
        from transformers.trainer_pt_utils import LabelSmoother

        self.model = model
        self.smooth, self.plain = LabelSmoother(epsilon=epsilon), LabelSmoother(epsilon=0.0)

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        smoother = self.smooth if self.model.training else self.plain
        return smoother(outputs, labels, shift_labels=True)


# -- generation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    batch_size: int,
    max_new_tokens: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    max_prompt_length: int | None = None,
) -> list[str]:
    """Continuations of ``prompts`` (left-padded batches; greedy, or beam search with ``num_beams`` > 1).

    A prompt longer than ``max_prompt_length`` tokens keeps its last ``max_prompt_length`` tokens.
    """
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": num_beams,
                               "pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos_id(tokenizer)}
    if num_beams > 1:
        options.update(length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size, early_stopping=True)
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [tokenizer(p)["input_ids"][-(max_prompt_length or 0):] for p in prompts[start:start + batch_size]]
            batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
            out = model.generate(**batch, **options)
            new = out[:, batch["input_ids"].shape[1]:]
            texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts


def score_answers(predictions: list[str], golds: list[str], tasks: list[str] | None = None) -> dict[str, Any]:
    """Exact match of the extracted final answers, overall and per task."""
    result: dict[str, Any] = {"exact_match": exact_match(predictions, golds)}
    if tasks is not None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, task in enumerate(tasks):
            groups[task].append(i)
        result["exact_match_by_task"] = {
            task: exact_match([predictions[i] for i in idx], [golds[i] for i in idx])
            for task, idx in sorted(groups.items())
        }
    return result


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# -- training ----------------------------------------------------------------------------------------------------
def setup(options: RunOptions, records, prompt_fn, response_fn):
    """Model with the method, tokenizer, tokenised train/validation sets, ``TrainingArguments`` (also data-to-text)."""
    from transformers import set_seed

    from peftlab.models import load_causal_lm

    set_seed(options.seed)
    model, tokenizer = load_causal_lm(options.model)
    tokenizer.padding_side = "right"
    eos_id(tokenizer)
    texts = [prompt_fn(row) for row in records["train"]] if options.adapter_args.get("num_heads") == "auto" else None
    model = prepare_model(model, options, classification=False, texts=texts)
    train_set = encode_records(select(records["train"], options.max_train_samples, options.split_seed), tokenizer,
                               options.max_length, prompt_fn, response_fn)
    val_set = encode_records(select(records["validation"], options.max_eval_samples, options.split_seed), tokenizer,
                             options.max_length, prompt_fn, response_fn)
    if not len(train_set):
        raise RecipeError(f"{options.data}: the training split is empty")
    args = training_arguments(options, len(train_set), "loss", greater_is_better=False)
    return model, tokenizer, train_set, val_set, args


def make_trainer(options: RunOptions, model, tokenizer, args, train_set, val_set):
    from peftlab.trainer import Trainer

    loss = CausalLoss(model, options.label_smoothing) if options.label_smoothing > 0 else None
    return Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set, processing_class=tokenizer,
                   data_collator=collator(tokenizer), compute_loss_func=loss)


def evaluate_answers(model, tokenizer, records, options: RunOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Exact match of greedy generations on ``records`` (and the prediction rows)."""
    prompts = [record_prompt(r) for r in records]
    predictions = generate(model, tokenizer, prompts, options.eval_batch_size, options.max_new_tokens,
                           num_beams=options.num_beams, length_penalty=options.length_penalty,
                           no_repeat_ngram_size=options.no_repeat_ngram_size, max_prompt_length=options.max_length)
    golds = list(records["output"])
    tasks = list(records["task"]) if "task" in records.column_names else None
    rows = [{"prompt": p, "prediction": y, "reference": g, **({"task": tasks[i]} if tasks else {})}
            for i, (p, y, g) in enumerate(zip(prompts, predictions, golds, strict=True))]
    return score_answers(predictions, golds, tasks), rows


def train(options: RunOptions) -> dict[str, Any]:
    """Instruction-tune ``options.model`` with ``options.method``; write adapter, metrics, curve, predictions."""
    options = options.resolved()
    checkpoint = check_output_dir(options)
    records = load_records(options.data, options.split_seed)
    model, tokenizer, train_set, val_set, args = setup(options, records, record_prompt, _output)
    test_records = select(records["test"], options.max_test_samples, options.split_seed)
    test_set = encode_records(test_records, tokenizer, options.max_length, record_prompt, _output)
    trainable, total = count_parameters(model)
    with args.main_process_first(local=False):
        out = start_output_dir(options, main_process=args.process_index == 0)
    trainer = make_trainer(options, model, tokenizer, args, train_set, val_set)
    main = trainer.is_world_process_zero()
    log(f"peftlab train: {options.method} (r={options.r}, lr={options.lr:g}) on {options.model}, {options.data}: "
        f"{len(train_set)} train / {len(val_set)} validation / {len(test_records)} test examples; trainable params "
        f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)", main)
    initial = None
    if options.initial_eval and checkpoint is None and main:
        initial, _ = evaluate_answers(trainer.model, tokenizer, test_records, options)
        log(f"test exact match before training (step 0): {fmt(initial['exact_match'])}", main)
    training = run_training(trainer, checkpoint)
    test = strip_prefix(trainer.evaluate(test_set, metric_key_prefix="test"), "test")
    test["perplexity"] = perplexity(test["loss"])
    metrics: dict[str, Any] = {
        "task": "causal-lm", "method": options.method, "model": options.model, "data": options.data,
        "metric": "exact_match", "num_train": len(train_set), "num_validation": len(val_set),
        "num_test": len(test_records), "trainable_params": trainable, "total_params": total,
        "initial_test": initial, **training,
    }
    if main:
        answers, rows = evaluate_answers(trainer.model, tokenizer, test_records, options)
        test.update(answers)
        write_jsonl(out / "predictions.jsonl", rows)
    metrics["test"] = test
    finish_run(trainer, out, metrics, "loss", options.keep_checkpoints)
    log(f"test exact match after training: {fmt(test.get('exact_match'))}, test perplexity {test['perplexity']:.3f} "
        f"({training['seconds_per_step']:.2f} s/step)", main)
    log(f"wrote {out / METRICS_FILE}, {out / CURVE_FILE}, predictions.jsonl and the adapter to {out}", main)
    return metrics


# -- loading a trained run ---------------------------------------------------------------------------------------
def load_trained(path: str | os.PathLike, model_name: str | None = None):
    """(model, tokenizer) of a trained run: the base causal LM with the adapter, or the saved full model."""
    from peftlab.models import load_causal_lm

    if is_adapter_dir(path):
        model, tokenizer = load_causal_lm(base_model_name(path, model_name))
        try:
            return AdapterModel.from_pretrained(model, path), tokenizer
        except ValueError as err:
            raise RecipeError(str(err)) from None
    model, tokenizer = load_causal_lm(str(path))
    return model.eval(), tokenizer


def evaluate(
    adapter: str | os.PathLike,
    model: str | None = None,
    data: str | None = None,
    split: str = "test",
    max_samples: int | None = None,
    batch_size: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Exact match and perplexity of a trained run on a split (the run's own options unless overridden)."""
    options = eval_options(adapter, "causal-lm", model, data, batch_size, overrides)
    check_split(split)
    records = load_records(options.data, options.split_seed)
    net, tokenizer = load_trained(adapter, options.model)
    rows = select(records[split], max_samples or options.max_test_samples, options.split_seed)
    if not len(rows):
        raise RecipeError(f"{options.data}: the {split} split is empty")
    metrics, _ = evaluate_answers(net, tokenizer, rows, options)
    loss = mean_loss(net, tokenizer, encode_records(rows, tokenizer, options.max_length, record_prompt, _output),
                     options.eval_batch_size)
    metrics.update(loss=loss, perplexity=perplexity(loss))
    return {"task": "causal-lm", "adapter": str(adapter), "model": options.model, "data": options.data,
            "split": split, "num_examples": len(rows), "metric": "exact_match", split: metrics}


def check_split(split: str) -> None:
    if split not in ("train", "validation", "test"):
        raise RecipeError(f"unknown split {split!r}; use train, validation or test")


def eval_options(adapter, task: str, model, data, batch_size, overrides: dict[str, Any]) -> RunOptions:
    """The options a run was trained with, updated by the evaluation's own (for ``peftlab eval``)."""
    options = saved_run_options(adapter) or RunOptions(task=task)
    changes = {k: v for k, v in {"model": model, "data": data, "eval_batch_size": batch_size, **overrides}.items()
               if v is not None}
    return RunOptions.from_dict({**options.to_dict(), **changes, "output_dir": str(adapter), "resume": False,
                                 "overwrite": False}).resolved()


@torch.no_grad()
def mean_loss(model, tokenizer, encoded, batch_size: int) -> float:
    """Mean response loss (nats per token, averaged over batches) of ``encoded`` rows, via the Trainer's eval loop."""
    import tempfile

    from transformers import TrainingArguments

    from peftlab.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to="none",
                                 disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, processing_class=tokenizer, data_collator=collator(tokenizer))
        return float(trainer.evaluate(encoded)["eval_loss"])
