"""Mixed-adapter batches: the cost of one batch whose rows use different adapters, against the base model, on the
batched path (stacked adapters, per-row gathered weights, :mod:`peftlab.batched`) and on the old grouped path (one
group of rows per adapter, :func:`peftlab.mixed.grouped_rows`), measured side by side in one run.

The model gets one adapter of each registered method (HRA, HydraLoRA, LoRA, MTLoRA; r = 8 on q_proj / v_proj),
moved away from its initialisation. The batch has ``--rows`` rows of ``--tokens`` random tokens, the rows split
evenly between the 4 adapters. Two measurements per variant, the variants interleaved (``_harness.run_interleaved``,
medians of ``--reps`` after one discarded round, which also builds the cached stacks):

- forward: one forward pass over the whole batch (prefill);
- generate: greedy ``generate`` of ``--new-tokens`` tokens per row.

Goals: the mixed forward ≤ 1.10× the base model's, greedy generation ≤ 1.30×. Then a scaling table: a
``--scaling-rows``-row batch (forward only) with 1, 4 and 16 distinct adapters (12 more adapters are added: four
per method; 1 = LoRA, 4 = one per method, 16 = all), row i using adapter i mod k, so rows of one adapter are not
next to each other. Before timing, the script checks that each mixed row equals its own run (``set_adapter``).

    .venv/bin/python benchmarks/mixed_batch.py --model smollm2-135m --threads 1 --clock cpu   (~10 min on 2 cores)
    .venv/bin/python benchmarks/mixed_batch.py --quick                  (a random 4-layer Llama, seconds)
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from _harness import (
    CLOCKS,
    Timings,
    add_run_options,
    apply_run_options,
    emit_report,
    fmt_ms,
    header_lines,
    markdown_table,
    ratio,
    ratio_of,
    run_interleaved,
)

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import AdapterModel
from peftlab.methods.base import ADAPTERS
from peftlab.mixed import grouped_rows

GOALS = {"forward": 1.10, "generate": 1.30}  # mixed batch (batched path) / base model
BASE_NAME, NEW, OLD = "base model (adapters disabled)", "mixed, batched path (new)", "mixed, grouped path (old)"


def load(args: argparse.Namespace):
    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        return LlamaForCausalLM(config).eval(), "random Llama (4 layers, hidden 256)"
    from peftlab.base_models import load_causal_lm

    model, _ = load_causal_lm(args.model)
    return model.eval(), args.model


def add_adapters(net: AdapterModel, names: dict[str, str], r: int, seed: int) -> None:
    """``names``: adapter name → method. Each parameter is moved away from its init (so each adapter matters)."""
    g = torch.Generator().manual_seed(seed)
    for name, method in names.items():
        net.add_adapter(name, ADAPTERS[method].config_class(r=r, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in net._layers():
            for name in names:
                for p in layer.adapters[name].parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    net.eval()


def batch(model, rows: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, model.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def per_row_error(net: AdapterModel, ids, mask, entries: list[str], grouped: bool) -> float:
    """max |mixed − own run| over the logits, each row's own run with ``set_adapter`` on the whole batch."""
    with grouped_rows() if grouped else contextlib.nullcontext():
        mixed = net(input_ids=ids, attention_mask=mask, adapter_names=entries).logits
    err = 0.0
    for name in dict.fromkeys(entries):
        net.set_adapter(name)
        rows = [i for i, e in enumerate(entries) if e == name]
        err = max(err, (mixed[rows] - net(input_ids=ids[rows], attention_mask=mask[rows]).logits).abs().max().item())
    return err


def variants(net: AdapterModel, ids, mask, entries: list[str], gen: dict | None) -> dict:
    """base / batched / grouped jobs (forward, and generate when ``gen`` is given) for one batch."""
    def forward(**kw):
        return net(input_ids=ids, attention_mask=mask, **kw).logits

    def generate(**kw):
        return net.generate(input_ids=ids, attention_mask=mask, **gen, **kw)

    def base(call):
        with net.disable_adapter():
            return call()

    def grouped(call):
        with grouped_rows():
            return call(adapter_names=entries)

    calls = {"forward": forward, **({"generate": generate} if gen else {})}
    return {
        BASE_NAME: {what: (lambda c=c: base(c)) for what, c in calls.items()},
        NEW: {what: (lambda c=c: c(adapter_names=entries)) for what, c in calls.items()},
        OLD: {what: (lambda c=c: grouped(c)) for what, c in calls.items()},
    }


def measure(jobs: dict, reps: int, clock: str) -> Timings:
    timings = Timings()
    with torch.inference_mode():
        run_interleaved(jobs, {n: reps for n in jobs}, {n: 1 for n in jobs}, timings, clock=CLOCKS[clock])
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="causal LM (default smollm2-135m)")
    parser.add_argument("--quick", action="store_true", help="a random 4-layer Llama instead of --model")
    parser.add_argument("--rows", type=int, default=8, help="batch rows, split evenly over 4 adapters (default 8)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per row (default 128)")
    parser.add_argument("--new-tokens", type=int, default=16, help="generated tokens per row (default 16)")
    parser.add_argument("--scaling-rows", type=int, default=16, help="rows of the scaling batch (default 16)")
    parser.add_argument("--scaling-tokens", type=int, default=128, help="tokens per row there (default 128)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    add_run_options(parser, clock=True)
    args = parser.parse_args()
    apply_run_options(args)
    model, described = load(args)
    net = AdapterModel(model)
    methods = sorted(ADAPTERS)
    add_adapters(net, {m: m for m in methods}, args.r, seed=0)
    if args.rows % len(methods):
        parser.error(f"--rows must be a multiple of {len(methods)}")
    per = args.rows // len(methods)
    entries = [n for n in methods for _ in range(per)]
    ids, mask = batch(model, args.rows, args.tokens, seed=1)
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
           "pad_token_id": 0}
    with torch.inference_mode():
        errors = {path: per_row_error(net, ids, mask, entries, path == "grouped") for path in ("batched", "grouped")}
    timings = measure(variants(net, ids, mask, entries, gen), args.reps, args.clock)
    ref = {what: timings.median_ms(f"{BASE_NAME}/{what}") for what in GOALS}
    rows = [[name, *(cell for what in GOALS for cell in (fmt_ms(timings.median_ms(f"{name}/{what}")),
                                                             ratio(timings.median_ms(f"{name}/{what}"), ref[what])))]
            for name in (BASE_NAME, NEW, OLD)]
    verdicts = []
    for what, goal in GOALS.items():
        got = ratio_of(timings.median_ms(f"{NEW}/{what}"), ref[what])
        verdicts.append(f"{what}: batched path {got:.2f}× the base model (goal ≤ {goal:.2f}×: "
                        f"{'met' if got is not None and got <= goal else 'NOT met'}); grouped path "
                        f"{ratio(timings.median_ms(f'{OLD}/{what}'), ref[what])}")

    # scaling: 16 adapters (four per method), batches using 1, 4 or 16 of them
    extra = {f"{m}_{i}": m for i in range(1, 4) for m in methods}
    add_adapters(net, extra, args.r, seed=2)
    order = [f"{m}_{i}" if i else m for i in range(4) for m in ["lora", *[m for m in methods if m != "lora"]]]
    s_ids, s_mask = batch(model, args.scaling_rows, args.scaling_tokens, seed=3)
    scaling_rows = []
    for k in (1, 4, 16):
        s_entries = [order[i % k] for i in range(args.scaling_rows)]
        with torch.inference_mode():
            err = per_row_error(net, s_ids, s_mask, s_entries, grouped=False)
        t = measure(variants(net, s_ids, s_mask, s_entries, None), args.reps, args.clock)
        base_ms = t.median_ms(f"{BASE_NAME}/forward")
        scaling_rows.append([str(k), fmt_ms(base_ms),
                             *(c for n in (NEW, OLD) for c in (fmt_ms(t.median_ms(f"{n}/forward")),
                                                               ratio(t.median_ms(f"{n}/forward"), base_ms))),
                             f"{err:.1e}"])

    unit = "CPU ms" if args.clock == "cpu" else "ms"
    lines = header_lines(["transformers"]) + [
        f"model: {described}; adapters: {', '.join(methods)} (r = {args.r}, q_proj/v_proj); {args.rows} rows × "
        f"{args.tokens} tokens, {per} rows per adapter; generate: greedy, {args.new_tokens} new tokens per row; "
        f"medians of {args.reps} ({args.clock} clock)",
        f"check: max |mixed − own run| over the logits: batched path {errors['batched']:.2e}, grouped path "
        f"{errors['grouped']:.2e}",
        "",
        *markdown_table(["variant", f"forward {unit}", "× base", f"generate {unit}", "× base"], rows,
                        right={1, 2, 3, 4}),
        "",
        *(f"- {v}" for v in verdicts),
        "",
        f"scaling: {args.scaling_rows} rows × {args.scaling_tokens} tokens, forward; k distinct adapters of 16 loaded "
        "(1: LoRA; 4: one per method; 16: four per method), row i uses adapter i mod k",
        "",
        *markdown_table(["distinct adapters", f"base {unit}", f"batched {unit}", "× base", f"grouped {unit}",
                         "× base", "max error vs own run"], scaling_rows, right={0, 1, 2, 3, 4, 5, 6}),
    ]
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
