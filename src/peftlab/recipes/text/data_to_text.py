"""Data-to-text generation (E2E / WebNLG / DART, as in the LoRA and MTLoRA papers).

Data: E2E files (``meaning representation || reference`` lines, or the official CSV with ``mr``/``ref``
columns; ``peftlab.data.read_e2e``), WebNLG / DART JSON files of the LoRA repository's
``examples/NLG/data`` (a JSON object: ``webnlg_challenge_2017/*.json``; a JSON array:
``dart/dart-v1.1.1-full-*.json``; ``peftlab.data.read_triples``, triples linearised as
``subject : predicate : object | …``), or ``e2e-synthetic`` (seeded restaurant MRs with 2-3 references
each). Splits keep every input with all its references in one split. The causal LM learns
``<input> ||`` → `` <reference><eos>`` (loss on the reference only, as in ``causal_lm``; label smoothing
optional, the MTLoRA paper uses 0.1). Test inputs are decoded with beam search (``num_beams``,
``length_penalty``, ``no_repeat_ngram_size``; the paper's 10 / 0.9 / 4 by default) and scored against all
their references with ``peftlab.metrics.generation_metrics``: BLEU, TER, chrF, NIST, ROUGE-L, METEOR (when
``java`` is on PATH; otherwise listed under ``skipped`` with the reason) and CIDEr. WebNLG and DART
outputs and references are lower-cased and tokenised first, as the LoRA repository's evaluation does
(``gpt2_decode.py --tokenize --lower``); E2E texts are scored as they are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peftlab.errors import RecipeError
from peftlab.recipes.options import WHOLE, RunOptions
from peftlab.recipes.rundir import (
    owns_output_dir,
)
from peftlab.recipes.test_items import ITEMS, ItemScores, item_key
from peftlab.recipes.text.generation import generate
from peftlab.recipes.text.lm import load_trained, start_run
from peftlab.recipes.training import quiet_datasets, run_training, split_rows, strip_prefix

MIN_INPUTS = 3  # one distinct input for each of train, validation and test
GENERATED_MRS = 400  # distinct MRs of ``e2e-synthetic`` (2-3 references each)
NAMED_DATA = {"e2e-synthetic": "seeded synthetic restaurant MRs in the E2E format, 2-3 references each"}


def prompt_for(mr: str) -> str:
    """The model's input for one meaning representation (the E2E ``context ||`` layout)."""
    return f"{mr} ||"


def _prompt(row: dict[str, Any]) -> str:
    return prompt_for(row["mr"])


def _reference(row: dict[str, Any]) -> str:
    return " " + row["ref"].strip()


def data_format(name: str) -> str:
    """``"webnlg"``, ``"dart"`` (JSON files, told apart by their shape) or ``"e2e"`` (anything else)."""
    from peftlab.data import triples_format

    path = Path(name).expanduser()
    return (triples_format(path) if path.is_file() else None) or "e2e"


def load_pairs(name: str, split_seed: int = 0, min_inputs: int = 1):
    """A ``DatasetDict`` (train/validation/test) of ``{mr, ref}`` rows, every input in one split; rows without an
    input are dropped, and fewer than ``min_inputs`` distinct inputs (training: one per split) is a DataError."""
    from peftlab.data import DataError, generate_e2e, read_e2e, read_triples, split_by_mr

    if name in NAMED_DATA:
        pairs = generate_e2e(GENERATED_MRS, seed=split_seed)
    elif Path(name).expanduser().is_file():
        path = Path(name).expanduser()
        pairs = read_e2e(path) if data_format(name) == "e2e" else read_triples(path)
    else:
        raise DataError(
            f"unknown data-to-text data {name!r}; known: {', '.join(NAMED_DATA)}, an E2E file "
            "('mr || reference' lines, or a CSV with columns mr, ref), or a WebNLG / DART JSON file"
        )
    with quiet_datasets():
        pairs = pairs.filter(lambda row: bool(row["mr"].strip()))
    inputs = len(set(pairs["mr"]))
    if inputs < min_inputs:
        raise DataError(f"{name} has {inputs} distinct input(s) with a reference; the train, validation and test "
                        f"splits need at least {min_inputs}: add inputs (meaning representations or triples)")
    return split_by_mr(pairs, seed=split_seed)


def evaluate_generations(model, tokenizer, pairs, options: RunOptions) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                                                ItemScores]:
    """Beam-search outputs for every distinct input of ``pairs``, scored against all its references
    (lower-cased and tokenised first for WebNLG and DART, as the papers' evaluation does); the prediction rows;
    and per input its BLEU statistics (corpus BLEU is the BLEU of their sum)."""
    from peftlab.data import group_references
    from peftlab.metrics import generation_metrics

    grouped = group_references(pairs)
    from peftlab.recipes.scale import generation_kwargs

    hypotheses = generate(model, tokenizer, [prompt_for(mr) for mr in grouped["mr"]], **generation_kwargs(options))
    references = list(grouped["references"])
    rows = [{"mr": mr, "hypothesis": h, "references": refs}
            for mr, h, refs in zip(grouped["mr"], hypotheses, references, strict=True)]
    tokenize_lower = data_format(options.data) in ("webnlg", "dart")
    scores = generation_metrics(hypotheses, references, tokenize_lower=tokenize_lower, segment_statistics=True)
    items = ItemScores("bleu", [{"key": item_key(i, mr), "bleu_stats": stats} for i, (mr, stats) in
                                enumerate(zip(grouped["mr"], scores.pop("bleu_statistics"), strict=True))])
    categories = grouped["category"] if "category" in grouped.column_names else []
    if any(categories):
        for row, category in zip(rows, categories, strict=True):
            row["category"] = category
        scores.update(seen_unseen_metrics(hypotheses, references, categories, tokenize_lower))
    return scores, rows, items


def seen_unseen_metrics(hypotheses: list[str], references: list[list[str]], categories: list[str],
                        tokenize_lower: bool) -> dict[str, Any]:
    """WebNLG's split of the scores (the LoRA and MTLoRA papers' S / U / A columns): the generation metrics of
    the inputs whose category is one of the 10 seen in training (``seen``) and of the others (``unseen``), with
    ``num_seen_mrs`` / ``num_unseen_mrs``; a part with no input is left out and named in ``skipped_parts``."""
    from peftlab.data import WEBNLG_SEEN_CATEGORIES
    from peftlab.metrics import generation_metrics

    out: dict[str, Any] = {}
    for part, wanted in (("seen", True), ("unseen", False)):
        keep = [i for i, c in enumerate(categories) if (c in WEBNLG_SEEN_CATEGORIES) == wanted]
        out[f"num_{part}_mrs"] = len(keep)
        if keep:
            out[part] = generation_metrics([hypotheses[i] for i in keep], [references[i] for i in keep],
                                           tokenize_lower=tokenize_lower)
        else:
            out.setdefault("skipped_parts", []).append(part)
    return out


def _test_pairs(pairs, limit: int | None, seed: int):
    """Test rows of at most ``limit`` distinct MRs (all references of each kept)."""
    mrs = list(dict.fromkeys(pairs["mr"]))
    if limit is None or limit >= len(mrs):
        return pairs
    import random

    keep = set(random.Random(seed).sample(mrs, limit))
    return pairs.filter(lambda row: row["mr"] in keep)


def run_parts(options: RunOptions) -> tuple[Any, Any, Any, Any]:
    """(pairs, prompt of a pair, its reference, the test pairs of ``pairs``): what :func:`train` and
    :func:`peftlab.recipes.plan.plan` set up."""
    return (load_pairs(options.data, options.split_seed, MIN_INPUTS), _prompt, _reference,
            lambda pairs: _test_pairs(pairs[options.score_split], options.max_test_samples, options.split_seed))


@owns_output_dir
def train(options: RunOptions, checkpoint: str | None) -> dict[str, Any]:
    """Train on MR → text pairs; write adapter, metrics (BLEU, NIST, ROUGE-L, ...), curve and predictions."""
    split = options.score_split  # test, or validation for a trial of `compare --tune`
    run = start_run(options, *run_parts(options), lambda rows: f"{len(set(rows['mr']))} {split} MRs scored")
    test_pairs = run.test_rows
    training = run_training(run.trainer, checkpoint)
    test = strip_prefix(run.trainer.evaluate(run.test_set, metric_key_prefix=split), split)
    metrics: dict[str, Any] = {
        "task": "data-to-text", "method": options.method, "model": options.model, "data": options.data,
        "metric": "bleu", **run.sizes(), f"num_{split}_mrs": len(set(test_pairs["mr"])),
        "decoding": {"num_beams": options.num_beams, "length_penalty": options.length_penalty,
                     "no_repeat_ngram_size": options.no_repeat_ngram_size, "max_new_tokens": options.max_new_tokens},
        **training,
    }
    return run.finish(options, metrics, test, evaluate_generations, lambda scores: f"{split}: {summary(scores)}")


def summary(scores: dict[str, Any]) -> str:
    """``BLEU 12.34, TER 56.78, ...; skipped: METEOR (reason)`` for printing."""
    names = {"bleu": "BLEU", "ter": "TER", "chrf": "chrF", "nist": "NIST", "rouge_l": "ROUGE-L", "meteor": "METEOR",
             "cider": "CIDEr"}
    text = ", ".join(f"{label} {scores[key]:.2f}" for key, label in names.items() if key in scores)
    parts = [f"{part} {scores[part]['bleu']:.2f} ({scores[f'num_{part}_mrs']} MRs)" for part in ("seen", "unseen")
             if part in scores]
    if parts:
        text += f" (BLEU on WebNLG's {', '.join(parts)})"
    skipped = scores.get("skipped") or {}
    if skipped:
        text += "; skipped: " + "; ".join(f"{names.get(k, k)} ({why})" for k, why in skipped.items())
    return text


def evaluate(adapter: str | os.PathLike, options: RunOptions, split: str, max_samples: int | None) -> dict[str, Any]:
    """Generation metrics of a trained run on a split (the run's own options unless overridden)."""
    pairs = load_pairs(options.data, options.split_seed)
    limit = max_samples or (None if split == WHOLE else options.max_test_samples)
    rows = _test_pairs(split_rows(pairs, split), limit, options.split_seed)
    if not len(rows):
        raise RecipeError(f"{options.data}: the {split} split is empty")
    net, tokenizer = load_trained(adapter, options.model)
    scores, _, items = evaluate_generations(net, tokenizer, rows, options)
    return {"task": "data-to-text", "adapter": str(adapter), "model": options.model, "data": options.data,
            "split": split, "num_mrs": len(set(rows["mr"])), "metric": "bleu", split: scores, ITEMS: items}
