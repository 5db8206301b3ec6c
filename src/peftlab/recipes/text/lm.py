"""Prompt → response fine-tuning of a causal LM, shared by the causal-LM and data-to-text recipes.

Each example is ``prompt + response + EOS`` with labels -100 on the prompt, so the loss is on the
response only; the two parts are tokenised separately, so the boundary is exact. ``setup`` loads the
model, puts the method on it and tokenises the splits; ``make_trainer`` wires ``peftlab.Trainer``;
``mean_loss`` scores a split; ``load_trained`` loads a finished run for evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import PeftlabError, RecipeError
from peftlab.model import AdapterModel
from peftlab.recipes.adapters import count_parameters, prepare_model
from peftlab.recipes.options import RunOptions
from peftlab.recipes.rundir import CURVE_FILE, METRICS_FILE, base_model_name, is_adapter_dir, start_output_dir
from peftlab.recipes.test_items import ITEMS_FILE, write_items
from peftlab.recipes.text.generation import eos_id, write_jsonl
from peftlab.recipes.training import (
    finish_run,
    log,
    quiet_datasets,
    select,
    tracking_callbacks,
    training_arguments,
    with_length,
)


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
    """Tokenise prompt/response pairs; rows whose response is cut off entirely are dropped. The fingerprint is
    named from the rows', the tokenizer's name and size and ``datasets``' own hash of the two functions (their code
    and closure values, so two lambdas with one name differ); hashing ``encode`` itself would pickle the tokenizer."""
    import hashlib

    from datasets.fingerprint import Hasher

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        return encode_pair(tokenizer, prompt_fn(row), response_fn(row), max_length)

    key = (f"{records._fingerprint} {type(tokenizer).__name__} {tokenizer.name_or_path} {len(tokenizer)} "
           f"{max_length} {Hasher.hash(prompt_fn)} {Hasher.hash(response_fn)}")
    with quiet_datasets():
        encoded = records.map(encode, remove_columns=records.column_names,
                              new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])
        kept = encoded.filter(lambda row: any(label != -100 for label in row["labels"]))
    if len(records) and not len(kept):
        raise RecipeError(f"every response is cut off at --max-length {max_length}; raise --max-length")
    return with_length(kept)


def collator(tokenizer):
    """Pads input ids with the pad token and labels with -100 (HF ``DataCollatorForSeq2Seq``, decoder-only use)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def setup(options: RunOptions, records, prompt_fn, response_fn):
    """Model with the method, tokenizer, tokenised train/validation sets, ``TrainingArguments`` (also data-to-text)."""
    from transformers import set_seed

    from peftlab.base_models import load_causal_lm
    from peftlab.recipes.scale import load_kwargs

    set_seed(options.seed)
    model, tokenizer = load_causal_lm(options.model, **load_kwargs(options))
    tokenizer.padding_side = "right"
    eos_id(tokenizer)
    model = prepare_model(model, options, classification=False,
                          texts=lambda: [prompt_fn(row) for row in records["train"]])
    train_set = encode_records(select(records["train"], options.max_train_samples, options.split_seed), tokenizer,
                               options.max_length, prompt_fn, response_fn)
    val_set = encode_records(select(records["validation"], options.max_eval_samples, options.split_seed), tokenizer,
                             options.max_length, prompt_fn, response_fn)
    if not len(train_set):
        raise RecipeError(f"{options.data}: the training split is empty")
    args = training_arguments(options, len(train_set), "loss", greater_is_better=False,
                              label_smoothing_factor=options.label_smoothing)
    return model, tokenizer, train_set, val_set, args


def make_trainer(options: RunOptions, model, tokenizer, args, train_set, val_set):
    from peftlab.trainer import Trainer

    return Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set, processing_class=tokenizer,
                   data_collator=collator(tokenizer), callbacks=tracking_callbacks(options))


@dataclass
class LMRun:
    """A prompt → response training run, set up and ready to train (what causal-lm and data-to-text share)."""

    tokenizer: Any
    train_set: Any
    val_set: Any
    test_rows: Any  # the test records (for generation)
    test_set: Any  # the same, tokenised (for the test loss)
    trainable: int
    total: int
    out: Path
    trainer: Any
    main: bool  # the main process (it evaluates, generates and writes)

    def finish(self, options: RunOptions, metrics: dict[str, Any], test: dict[str, Any], score, summary) -> dict:
        """Score the test rows (validation rows for a trial of ``compare --tune``: ``options.score_split``) by
        generation (``score(model, tokenizer, rows, options)`` → (scores, prediction rows, item scores), main
        process only), then write ``predictions.jsonl``, ``test_items.jsonl`` (the scored split's items), the
        adapter, the curve and ``metrics.json`` (with ``metrics[options.score_split] = test``) and log
        ``summary(test)``."""
        if self.main:
            scores, rows, items = score(self.trainer.model, self.tokenizer, self.test_rows, options)
            test.update(scores)
            write_jsonl(self.out / "predictions.jsonl", rows)
            metrics["test_items"] = write_items(self.out / ITEMS_FILE, items)
        metrics[options.score_split] = test
        finish_run(self.trainer, self.out, metrics, "loss", options.keep_checkpoints)
        log(summary(test), self.main)
        log(f"wrote {self.out / METRICS_FILE}, {self.out / CURVE_FILE}, predictions.jsonl, {ITEMS_FILE} and the "
            f"adapter to "
            f"{self.out}", self.main)
        return metrics

    def sizes(self) -> dict[str, int]:
        return {"num_train": len(self.train_set), "num_validation": len(self.val_set),
                "trainable_params": self.trainable, "total_params": self.total}


def start_run(options: RunOptions, records, prompt_fn, response_fn, test_rows, describe_test) -> LMRun:
    """Model with the method, tokenised splits, the run folder and the trainer; logs the run's first line.

    ``test_rows(records)`` picks the test records (at most ``max_test_samples``); ``describe_test(rows)`` says
    how many there are in the task's words ("40 test MRs").
    """
    model, tokenizer, train_set, val_set, args = setup(options, records, prompt_fn, response_fn)
    test = test_rows(records)
    test_set = encode_records(test, tokenizer, options.max_length, prompt_fn, response_fn)
    trainable, total = count_parameters(model)
    with args.main_process_first(local=False):
        out = start_output_dir(options, main_process=args.process_index == 0)
    trainer = make_trainer(options, model, tokenizer, args, train_set, val_set)
    main = trainer.is_world_process_zero()
    log(f"peftlab train: {options.method} (r={options.r}, lr={options.lr:g}) on {options.model}, {options.data}: "
        f"{len(train_set)} train / {len(val_set)} validation, {describe_test(test)}; trainable params "
        f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)", main)
    return LMRun(tokenizer, train_set, val_set, test, test_set, trainable, total, out, trainer, main)


def load_trained(path: str | os.PathLike, model_name: str | None = None):
    """(model, tokenizer) of a trained run: the base causal LM with the adapter, or the saved full model."""
    from peftlab.base_models import load_causal_lm

    if is_adapter_dir(path):
        model, tokenizer = load_causal_lm(base_model_name(path, model_name))
        try:
            return AdapterModel.from_pretrained(model, path), tokenizer
        except PeftlabError as err:
            raise RecipeError(str(err)) from None
    model, tokenizer = load_causal_lm(str(path))
    return model.eval(), tokenizer


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
