"""Multiple-choice evaluation by log-likelihood (OpenCompass' PPL evaluation of MMLU): ``peftlab eval --task
multiple-choice``.

Design notes: ``docs/design.md``, section peftlab.recipes.text.multiple_choice.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch

from peftlab.errors import RecipeError
from peftlab.recipes.test_items import ITEMS, ItemScores, item_key

TASK = "multiple-choice"
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = "mmlu"
DEFAULT_BATCH_SIZE = 8
CONTINUATIONS = ("letter", "text")
HINT = "The following are multiple choice questions (with answers) about {subject}.\n\n"


# -- prompts -----------------------------------------------------------------------------------------------------
def question_block(question) -> str:
    """``{question}\\nA. {a}\\nB. {b}...``: the question and its lettered options."""
    from peftlab.data.mmlu import LETTERS

    return question.question + "".join(f"\n{LETTERS[i]}. {text}" for i, text in enumerate(question.options))


def answer_text(question, index: int, continuation: str = "letter") -> str:
    """What follows ``Answer:`` for option ``index``: ``" B"``, or ``" " + option text``."""
    from peftlab.data.mmlu import LETTERS

    return " " + (LETTERS[index] if continuation == "letter" else question.options[index])


def build_prompt(question, examples: Sequence = (), continuation: str = "letter") -> str:
    """The subject line, the answered examples, then the question ending in ``Answer:``."""
    shots = "".join(f"{question_block(e)}\nAnswer:{answer_text(e, e.answer, continuation)}\n" for e in examples)
    return HINT.format(subject=question.subject) + shots + question_block(question) + "\nAnswer:"


# -- scoring -----------------------------------------------------------------------------------------------------
def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def continuation_logprobs(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    pad_id: int = 0,
    progress: bool = False,
) -> tuple[list[float], int]:
    """``(scores, truncated)``: for each ``(context ids, continuation ids)``, ``Σ_j log p(c_j | context, c_<j)``.

    One pass per distinct input ``(context + continuation)[:-1]``; inputs are left-padded (with explicit
    ``position_ids``) in batches of ``batch_size``, longest first, and only the last positions' logits are
    computed. An input longer than the model's positions loses tokens from its left (``truncated`` counts them).
    """
    from tqdm.auto import tqdm

    if any(not context or not cont for context, cont in requests):
        raise RecipeError("a prompt or an option's continuation is empty (no tokens)")
    limit = _max_positions(model)
    inputs: dict[tuple[int, ...], list[int]] = {}  # distinct input → indices of the requests it answers
    truncated = 0
    for i, (context, cont) in enumerate(requests):
        ids = (list(context) + list(cont))[:-1]
        if limit is not None and len(ids) > limit:
            if len(cont) > limit:
                raise RecipeError(f"an option is {len(cont)} tokens, more than the model's {limit} positions")
            ids, truncated = ids[-limit:], truncated + 1
        inputs.setdefault(tuple(ids), []).append(i)
    rows = sorted(inputs, key=len, reverse=True)
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    scores = [0.0] * len(requests)
    bar = tqdm(total=len(rows), desc="multiple-choice", unit="seq", disable=not progress, leave=False)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = len(batch[0])
        keep = max(len(requests[i][1]) for row in batch for i in inputs[row])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, row in enumerate(batch):
            ids[b, width - len(row):] = torch.tensor(row)
            mask[b, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": keep} if keep_arg else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       **kwargs).logits[:, -keep:]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for b, row in enumerate(batch):
            for i in inputs[row]:
                cont = torch.tensor(requests[i][1], device=logprobs.device)
                scores[i] = float(logprobs[b, keep - len(cont):].gather(-1, cont[:, None]).sum())
        bar.update(len(batch))
    bar.close()
    return scores, truncated


def score_options(model, tokenizer, questions: Sequence, examples: dict[str, Sequence], continuation: str = "letter",
                  batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> tuple[list[list[float]], int]:
    """``(scores, truncated)``: the log-likelihood of each option of each question (``scores[q][option]``)."""
    requests, owners = [], []
    for q, question in enumerate(questions):
        context = tokenizer(build_prompt(question, examples.get(question.subject, ()), continuation))["input_ids"]
        for index in range(len(question.options)):
            cont = tokenizer(answer_text(question, index, continuation), add_special_tokens=False)["input_ids"]
            requests.append((context, cont))
            owners.append(q)
    flat, truncated = continuation_logprobs(model, requests, batch_size, tokenizer.pad_token_id or 0, progress)
    scores: list[list[float]] = [[] for _ in questions]
    for q, value in zip(owners, flat, strict=True):
        scores[q].append(value)
    return scores, truncated


def accuracy_table(predictions: Sequence[int], answers: Sequence[int], subjects: Sequence[str]) -> dict[str, Any]:
    """Accuracy per subject, its mean over subjects (``accuracy``, macro) and over questions (``accuracy_micro``)."""
    per: dict[str, list[int]] = {}
    for p, a, s in zip(predictions, answers, subjects, strict=True):
        per.setdefault(s, []).append(int(p == a))
    table = {s: {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "num_questions": len(hits)}
             for s, hits in per.items()}
    correct = sum(row["correct"] for row in table.values())
    macro = sum(row["accuracy"] for row in table.values()) / len(table)
    return {"accuracy": macro, "accuracy_macro": macro, "accuracy_micro": correct / len(predictions),
            "correct": correct, "by_subject": table}


def gold_probability(scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Mean over questions of p(gold) = softmax(scores)[answer], the options' log-likelihoods normalised over the
    options: a continuous accuracy, less noisy than the argmax when a model is near chance (forgetting studies)."""
    probs = [torch.softmax(torch.tensor(s, dtype=torch.float64), 0)[a].item() for s, a in zip(scores, answers,
                                                                                             strict=True)]
    return sum(probs) / len(probs)


# -- the recipe --------------------------------------------------------------------------------------------------
def train(options) -> dict[str, Any]:
    """Refused: multiple-choice is scored, not trained (``recipe(task).train``)."""
    raise RecipeError(f"{TASK} is an evaluation task (peftlab eval --task {TASK}); train with --task causal-lm")


def load_model(adapter: str | os.PathLike | None, model: str | None):
    """(model, tokenizer): the base causal LM ``model`` (default smollm2-135m), or a trained run with its adapter."""
    from peftlab.base_models import load_causal_lm
    from peftlab.recipes.rundir import check_trained
    from peftlab.recipes.text.lm import load_trained

    if adapter is None:
        net, tokenizer = load_causal_lm(model or DEFAULT_MODEL)
        return net.eval(), tokenizer
    check_trained(adapter)
    net, tokenizer = load_trained(adapter, model)
    return net.eval(), tokenizer


def model_name(adapter: str | os.PathLike | None, model: str | None) -> str:
    """The base model's name, for the metrics: ``model``, the run's base model, or the run folder (a full model)."""
    from peftlab.recipes.rundir import base_model_name, is_adapter_dir

    if model or adapter is None:
        return model or DEFAULT_MODEL
    return base_model_name(adapter) if is_adapter_dir(adapter) else str(adapter)


def evaluate(
    adapter: str | os.PathLike | None = None,
    model: str | None = None,
    data: str | None = None,
    split: str = "test",
    max_samples: int | None = None,
    batch_size: int | None = None,
    subjects: str | Sequence[str] | None = None,
    shots: int | None = None,
    continuation: str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Accuracy of a base model (``adapter=None``) or a trained run on multiple-choice questions (default MMLU).

    ``max_samples`` caps the questions scored per subject (the first ones after the held-out examples);
    ``batch_size`` is the number of sequences per forward pass.
    """
    from peftlab.data.mmlu import load_multiple_choice

    given = [k for k, v in overrides.items() if v is not None]
    if given:
        raise RecipeError(f"{', '.join('--' + k.replace('_', '-') for k in given)} does not apply to --task {TASK}")
    if split != "test":
        raise RecipeError(f"--task {TASK} scores the test questions (a dev split only gives the examples); "
                          f"--split {split} is not available")
    continuation = continuation or "letter"
    if continuation not in CONTINUATIONS:
        raise RecipeError(f"unknown continuation {continuation!r}; use {' or '.join(CONTINUATIONS)}")
    shots = 0 if shots is None else shots
    data = data or DEFAULT_DATA
    questions_set = load_multiple_choice(data, subjects, shots)
    questions = [q for rows in questions_set.scored.values() for q in rows[:max_samples]]
    net, tokenizer = load_model(adapter, model)
    scores, truncated = score_options(net, tokenizer, questions, questions_set.examples, continuation,
                                      batch_size or DEFAULT_BATCH_SIZE, progress)
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    table = accuracy_table(predictions, [q.answer for q in questions], [q.subject for q in questions])
    table["gold_probability"] = gold_probability(scores, [q.answer for q in questions])
    items = ItemScores("macro_mean", [  # accuracy_table's hits, the question's subject as its group
        {"key": item_key(i, q.subject, q.question, list(q.options)), "group": q.subject, "value": int(p == q.answer)}
        for i, (q, p) in enumerate(zip(questions, predictions, strict=True))])
    held = sorted(s for s, h in questions_set.held_out.items() if h)
    if not shots:
        examples = "none (0-shot)"
    elif not held:
        examples = f"the first {shots} dev rows of each subject"
    else:
        examples = (f"the first {shots} questions of {'each' if len(held) == len(questions_set.held_out) else 'some'}"
                    f" subject{'' if len(held) == 1 else 's'} (no dev split), left out of scoring")
    return {"task": TASK, "adapter": None if adapter is None else str(adapter),
            "model": model_name(adapter, model), "data": data, "split": "test",
            "num_examples": len(questions), "num_subjects": len(table["by_subject"]), "metric": "accuracy",
            "shots": shots, "examples": examples, "held_out_subjects": held, "continuation": continuation,
            "num_truncated": truncated, "test": table, ITEMS: items}


def summary(metrics: dict[str, Any], folder: str | os.PathLike | None) -> str:
    """``test accuracy of RUN on mmlu (0-shot): 0.4 macro (mean of 5 subjects), 0.41 micro (200 questions)``."""
    table = metrics[metrics["split"]]
    return (f"{metrics['split']} accuracy of {folder or metrics['model']} on {metrics['data']} "
            f"({metrics['shots']}-shot): {table['accuracy_macro']:.4f} macro (mean of {metrics['num_subjects']} "
            f"subjects), {table['accuracy_micro']:.4f} micro ({metrics['num_examples']} questions)")
