"""Generating text from a (possibly adapted) causal LM, shared by the causal-LM and data-to-text recipes.

``generate`` decodes batches of prompts (left-padded; greedy or beam search) through the model's own
``generate``; ``write_jsonl`` saves the predictions next to the run's metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import RecipeError


def eos_id(tokenizer) -> int:
    """The id that ends a response: EOS, else SEP (BERT-style vocabularies)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise RecipeError(f"{type(tokenizer).__name__} has no EOS or SEP token to end a response with")


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


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
