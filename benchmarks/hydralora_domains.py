"""HydraLoRA against LoRA and HRA on heterogeneous data: sentiment-4domains (movie, tweets, amazon, nyt), MiniLM.

Variants: HydraLoRA r = 8 with N = ``estimate_num_heads`` (training texts) heads and with N = 4 (one per
domain, the paper's default; ``--num-heads`` sets the list), LoRA r = 8, LoRA with the rank whose trainable
parameter count is closest to the largest HydraLoRA's, HRA r = 8. Every variant and seed gets the
same budget: the same training subset, 1 epoch, batch 32, max_length 64, linear schedule with 6 % warm-up,
the method's learning rate from ``peftlab.recipes`` (hra 1e-2, lora / hydralora 3e-3), adapters on
query, value (or ``--targets``) plus the classifier head (``modules_to_save``), ``peftlab.Trainer``, no
evaluation or model selection during training. Measured on the test split (mean ± std over seeds):

- accuracy, overall and per domain (scikit-learn);
- trainable parameters (adapter + classifier head);
- training seconds per optimizer step (Trainer ``train_runtime`` / steps);
- HydraLoRA with N > 1, routing per domain: each domain's test examples go through the trained model in
  length-sorted batches (little padding); after each batch ``model.routing_stats()`` gives every adapted
  layer's mean router weight ω per head; ω is averaged over layers and batches (domain × head table).
  "layer spread" = mean over layers of the total-variation distance between the domain's ω and the mean ω
  of all domains in that layer: 0 when all domains are routed alike, even where averaging layers hides it.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/hydralora_domains.py [--seeds 3] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections import Counter

import numpy as np
import torch
from _harness import add_run_options, apply_run_options, emit_report, header_lines, markdown_table
from sklearn.metrics import accuracy_score
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, set_seed
from transformers.trainer_callback import PrinterCallback

from peftlab.base_models import load_classifier
from peftlab.data import load_dataset
from peftlab.data.clusters import estimate_num_heads
from peftlab.recipes.adapters import count_parameters, prepare_model
from peftlab.recipes.options import RunOptions
from peftlab.recipes.text.classification import tokenize
from peftlab.recipes.training import quiet_datasets, select, training_arguments
from peftlab.trainer import Trainer

DATA, DOMAINS = "sentiment-4domains", ("movie", "tweets", "amazon", "nyt")


def run_options(method: str, r: int, seed: int, args: argparse.Namespace, heads: int | None = None) -> RunOptions:
    extra = {"num_heads": heads} if method == "hydralora" else {}
    return RunOptions(task="classification", model="minilm", data=DATA, method=method, r=r, seed=seed,
                      epochs=1.0, batch_size=32, max_length=64, target_modules=args.targets, adapter_args=extra,
                      output_dir=tempfile.gettempdir()).resolved()


def build(options: RunOptions):
    """(model with the adapter, tokenizer); head and adapter initialised from the seed, as in the recipe."""
    set_seed(options.seed)
    model, tokenizer = load_classifier(options.model, 2)
    return prepare_model(model, options, classification=True), tokenizer


def trainable(method: str, r: int, args: argparse.Namespace, heads: int | None = None) -> int:
    return count_parameters(build(run_options(method, r, 0, args, heads))[0])[0]


@torch.no_grad()
def evaluate(model, tokenizer, test_sets: dict, batch_size: int = 64) -> tuple[dict, dict]:
    """Predictions per domain, and per domain the routing ω (layers, heads) averaged over batches (HydraLoRA)."""
    model.eval()
    collate = DataCollatorWithPadding(tokenizer)
    preds, routing = {}, {}
    for domain, rows in test_sets.items():
        loader = DataLoader(rows.remove_columns(["label", "length"]), batch_size=batch_size, collate_fn=collate)
        out, stats = [], []
        for batch in loader:
            out.append(model(**batch).logits.argmax(-1))
            if layers := model.routing_stats():
                stats.append(torch.stack(list(layers.values())))
        preds[domain] = torch.cat(out).numpy()
        if stats:
            routing[domain] = torch.stack(stats).mean(0).numpy()
    return preds, routing


def train_and_test(options: RunOptions, train_set, test_sets: dict) -> dict:
    model, tokenizer = build(options)
    with tempfile.TemporaryDirectory() as tmp:
        targs = training_arguments(dataclasses.replace(options, output_dir=tmp), len(train_set), "accuracy", True)
        targs = dataclasses.replace(targs, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
                                    logging_strategy="no", disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=train_set, processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer))
        trainer.remove_callback(PrinterCallback)
        result = trainer.train()
    preds, routing = evaluate(model, tokenizer, test_sets)
    labels = {d: np.asarray(test_sets[d]["label"]) for d in test_sets}
    acc = {d: accuracy_score(labels[d], preds[d]) for d in test_sets}
    acc["overall"] = accuracy_score(np.concatenate(list(labels.values())), np.concatenate(list(preds.values())))
    return {"acc": acc, "params": count_parameters(model)[0], "loss": result.training_loss,
            "s_per_step": result.metrics["train_runtime"] / max(1, result.global_step), "routing": routing}


def pm(values, scale: float = 1.0, digits: int = 1) -> str:
    v = scale * np.asarray(values, dtype=float)
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if v.size > 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    p.add_argument("--max-train-samples", type=int, default=4000)
    p.add_argument("--max-test-samples", type=int, default=None, help="default: the whole test split")
    p.add_argument("--targets", default="query,value")
    p.add_argument("--num-heads", default="auto,4",
                   help="HydraLoRA's N values, comma-separated; 'auto' = estimate_num_heads on the training texts")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 300 train and 200 test samples")
    add_run_options(p)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.max_train_samples, args.max_test_samples = 1, 300, 200
    apply_run_options(args)
    started = time.perf_counter()
    head = ["# HydraLoRA on heterogeneous data (sentiment-4domains, MiniLM)", "",
            *(f"- {line}" for line in header_lines(("transformers",)))]
    print("\n".join(head), flush=True)

    data = load_dataset(DATA)
    train_rows = select(data["train"], args.max_train_samples, 0)
    test_rows = select(data["test"], args.max_test_samples, 0)
    _, tokenizer = load_classifier("minilm", 2)
    train_set = tokenize(train_rows, tokenizer, 64)
    with quiet_datasets():
        test_sets = {d: tokenize(test_rows.filter(lambda x, d=d: x == d, input_columns="domain"), tokenizer, 64,
                                 sort=True) for d in DOMAINS}

    estimate, clusters = estimate_num_heads(list(train_rows["text"]), max_heads=8)
    head_counts = list(dict.fromkeys(estimate if h.strip() == "auto" else int(h) for h in args.num_heads.split(",")))
    heads = max(head_counts)
    n_hydra = trainable("hydralora", 8, args, heads)
    n1, n2 = trainable("lora", 1, args), trainable("lora", 2, args)  # LoRA: head + r · per_rank
    per_rank, head_params = n2 - n1, n1 - (n2 - n1)
    matched = max(1, round((n_hydra - head_params) / per_rank))
    lines = head + [
        f"- data: {len(train_set)} train examples (1 epoch, batch 32, max_length 64), test "
        + ", ".join(f"{d} {len(s)}" for d, s in test_sets.items()) + f"; targets {args.targets} + classifier head; "
        f"seeds 0..{args.seeds - 1}",
        f"- estimate_num_heads(training texts, max_heads=8) → N = {estimate}; HydraLoRA runs with N in "
        f"{head_counts} (--num-heads {args.num_heads})"
        + (" (N = 1 is LoRA with one head and a router that always outputs 1)" if 1 in head_counts else ""),
        f"- parameter match: HydraLoRA r=8, N={heads}: {n_hydra:,} trainable; LoRA: {head_params:,} (head) + "
        f"{per_rank:,}·r → r = {(n_hydra - head_params) / per_rank:.2f}, rounded to r = {matched} "
        f"({head_params + matched * per_rank:,})",
        "", "## estimate_num_heads clusters × domains (training texts)", "",
    ]
    counts = Counter(zip(clusters.tolist(), train_rows["domain"], strict=True))
    lines += markdown_table(["cluster", *DOMAINS], [[str(c), *(str(counts[c, d]) for d in DOMAINS)]
                                                    for c in sorted(set(clusters.tolist()))])
    print("\n".join(lines[len(head):]), flush=True)

    variants = {f"HydraLoRA r=8, N={n}" + (" (estimated)" if n == estimate else ""): ("hydralora", 8, n)
                for n in head_counts}
    variants.update({"LoRA r=8": ("lora", 8, None), f"LoRA r={matched} (param-matched to N={heads})":
                     ("lora", matched, None), "HRA r=8": ("hra", 8, None)})
    if matched == 8:  # LoRA r=8 is already the closest match: train it once
        del variants["LoRA r=8"]
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for name, (method, r, n) in variants.items():
            options = run_options(method, r, seed, args, n)
            t0 = time.perf_counter()
            res = train_and_test(options, train_set, test_sets)
            results.setdefault(name, []).append({**res, "lr": options.lr})
            print(f"[{time.perf_counter() - t0:6.1f} s] seed {seed} {name}: accuracy {res['acc']['overall']:.4f}, "
                  f"{res['s_per_step']:.3f} s/step, train loss {res['loss']:.4f}", flush=True)

    lines += ["", f"## Test accuracy (%), mean ± std over {args.seeds} seed(s)", ""]
    rows = []
    for name, runs in results.items():
        acc = [pm([run["acc"][k] for run in runs], 100) for k in ("overall", *DOMAINS)]
        rows.append([name, f"{runs[0]['lr']:g}", f"{runs[0]['params']:,}", *acc,
                     pm([run["s_per_step"] for run in runs], digits=3)])
    lines += markdown_table(["variant", "lr", "trainable params", "overall", *DOMAINS, "train s/step"], rows)

    for name, (method, _, n) in variants.items():
        if method != "hydralora" or n < 2:
            continue
        hydra = results[name]
        lines += ["", f"## {name}: routing per domain, mean ω per head over layers and test batches", ""]
        rows = []
        for d in DOMAINS:
            omega = [run["routing"][d] for run in hydra]  # per seed: (layers, heads)
            mean = [np.mean([run["routing"][e] for e in DOMAINS], 0) for run in hydra]
            spread = [0.5 * np.abs(w - m).sum(-1).mean() for w, m in zip(omega, mean, strict=True)]
            rows.append([d, *(pm([w.mean(0)[h] for w in omega], digits=3) for h in range(n)), pm(spread, digits=3)])
        lines += markdown_table(["domain", *(f"head {h}" for h in range(n)), "layer spread"], rows)
    lines += ["", f"Total time: {time.perf_counter() - started:.0f} s"]

    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
