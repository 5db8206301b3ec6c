"""Causal-LM instruction tuning (MetaMathQA / HydraLoRA style): data → model → adapter → ``peftlab.Trainer`` → metrics.

Records are ``{instruction, input, output}`` (Alpaca layout; MetaMathQA ``{query, response}``, GSM8K
``{question, answer}`` and MATH ``{problem, solution}`` files are read as well). Each record becomes the
prompt ``PROMPT`` (or ``PROMPT_WITH_INPUT``) followed by the response and the end-of-sequence token; the loss
is on the response only (prompt labels are -100). Evaluation: perplexity of the responses (from the loss) during
training, and after it the exact match of the final answer extracted from greedy generations
(``The answer is: X`` / ``#### X`` / ``\\boxed{X}``, see ``peftlab.data.math``), overall and per ``task`` when
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
from peftlab.recipes.adapters import count_parameters
from peftlab.recipes.generation import generate, write_jsonl
from peftlab.recipes.lm import encode_records, load_trained, make_trainer, mean_loss, setup
from peftlab.recipes.options import RunOptions, check_split, eval_options
from peftlab.recipes.rundir import (
    CURVE_FILE,
    METRICS_FILE,
    check_output_dir,
    check_trained,
    owns_output_dir,
    saved_run_options,
    start_output_dir,
)
from peftlab.recipes.training import finish_run, fmt, log, run_training, select, speed, strip_prefix

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
            "{instruction, input, output}, {query, response} (MetaMathQA), {question, answer} (GSM8K) or "
            "{problem, solution} (MATH) records"
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
        f"({speed(training)})", main)
    log(f"wrote {out / METRICS_FILE}, {out / CURVE_FILE}, predictions.jsonl and the adapter to {out}", main)
    return metrics


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
    check_trained(adapter)
    options = eval_options(adapter, "causal-lm", saved_run_options(adapter),
                           {"model": model, "data": data, "eval_batch_size": batch_size, **overrides})
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


