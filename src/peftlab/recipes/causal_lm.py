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

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from peftlab.errors import RecipeError
from peftlab.metrics import exact_match, perplexity
from peftlab.recipes.generation import generate
from peftlab.recipes.lm import encode_records, load_trained, mean_loss, start_run
from peftlab.recipes.options import RunOptions
from peftlab.recipes.rundir import (
    owns_output_dir,
)
from peftlab.recipes.training import fmt, log, run_training, select, speed, strip_prefix

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


def record_prompt(row: dict[str, Any]) -> str:
    """The prompt of one ``{instruction, input, ...}`` record (what training, testing and ``num_heads=auto`` see)."""
    return format_prompt(row["instruction"], row.get("input") or "")


def _output(row: dict[str, Any]) -> str:
    return row["output"]


# -- scoring -----------------------------------------------------------------------------------------------------
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


# -- training and evaluation -------------------------------------------------------------------------------------
@owns_output_dir
def train(options: RunOptions, checkpoint: str | None) -> dict[str, Any]:
    """Instruction-tune ``options.model`` with ``options.method``; write the adapter, ``metrics.json`` (test exact
    match overall and per task, perplexity), the training curve and ``predictions.jsonl``."""
    run = start_run(options, load_records(options.data, options.split_seed), record_prompt, _output,
                    lambda records: select(records["test"], options.max_test_samples, options.split_seed),
                    lambda rows: f"{len(rows)} test examples")
    test_records = run.test_rows
    initial = None
    if options.initial_eval and checkpoint is None and run.main:
        initial, _ = evaluate_answers(run.trainer.model, run.tokenizer, test_records, options)
        log(f"test exact match before training (step 0): {fmt(initial['exact_match'])}", run.main)
    training = run_training(run.trainer, checkpoint)
    test = strip_prefix(run.trainer.evaluate(run.test_set, metric_key_prefix="test"), "test")
    test["perplexity"] = perplexity(test["loss"])
    metrics: dict[str, Any] = {
        "task": "causal-lm", "method": options.method, "model": options.model, "data": options.data,
        "metric": "exact_match", **run.sizes(), "num_test": len(test_records), "initial_test": initial, **training,
    }
    return run.finish(options, metrics, test, evaluate_answers, lambda scores: (
        f"test exact match after training: {fmt(scores.get('exact_match'))}, test perplexity "
        f"{scores['perplexity']:.3f} ({speed(training)})"))


def evaluate(adapter: str | os.PathLike, options: RunOptions, split: str, max_samples: int | None) -> dict[str, Any]:
    """Exact match and perplexity of a trained run on a split (the run's own options unless overridden)."""
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


