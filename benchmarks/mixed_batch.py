"""Mixed-adapter batches: throughput of one batch whose rows use 4 different adapters, against the same rows run
as 4 separate single-adapter batches (``set_adapter`` between them) and against the base model.

The model gets one adapter of each registered method (HRA, HydraLoRA, LoRA, MTLoRA; r = 8 on q_proj / v_proj),
moved away from its initialisation. The batch has ``--rows`` rows of ``--tokens`` random tokens, the rows split
evenly between the 4 adapters. Two measurements per variant, the variants interleaved (``_harness.run_interleaved``,
medians of ``--reps`` after one discarded round, one run):

- forward: one forward pass over the whole batch (prefill), tokens/s = rows·tokens / time;
- generate: greedy ``generate`` of ``--new-tokens`` tokens per row, tokens/s = rows·new_tokens / time.

Before timing, the script checks that the mixed batch gives each row what its separate batch gives.

    .venv/bin/python benchmarks/mixed_batch.py --model smollm2-135m     (SmolLM2-135M, offline; ~3 min on 2 cores)
    .venv/bin/python benchmarks/mixed_batch.py --quick                  (a random 4-layer Llama, seconds)
"""

from __future__ import annotations

import argparse

import torch
from _harness import (
    Timings,
    add_run_options,
    apply_run_options,
    emit_report,
    fmt_ms,
    header_lines,
    markdown_table,
    ratio,
    run_interleaved,
)

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import AdapterModel
from peftlab.methods.base import ADAPTERS


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


def with_adapters(model, r: int) -> tuple[AdapterModel, list[str]]:
    """One adapter per registered method, each parameter moved away from its init (so each adapter matters)."""
    net = AdapterModel(model)
    names = sorted(ADAPTERS)
    g = torch.Generator().manual_seed(0)
    for name in names:
        net.add_adapter(name, ADAPTERS[name].config_class(r=r, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in net._layers():
            for p in layer.adapters.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net.eval(), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="causal LM (default smollm2-135m)")
    parser.add_argument("--quick", action="store_true", help="a random 4-layer Llama instead of --model")
    parser.add_argument("--rows", type=int, default=8, help="batch rows, split evenly over 4 adapters (default 8)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per row (default 128)")
    parser.add_argument("--new-tokens", type=int, default=16, help="generated tokens per row (default 16)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    add_run_options(parser)
    args = parser.parse_args()
    apply_run_options(args)
    model, described = load(args)
    net, names = with_adapters(model, args.r)
    if args.rows % len(names):
        parser.error(f"--rows must be a multiple of {len(names)}")
    per = args.rows // len(names)
    entries = [n for n in names for _ in range(per)]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (args.rows, args.tokens), generator=g)
    mask = torch.ones_like(ids)
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
           "pad_token_id": 0}

    def separate(call):
        out = []
        for i, name in enumerate(names):
            net.set_adapter(name)
            out.append(call(ids[i * per:(i + 1) * per], mask[i * per:(i + 1) * per]))
        return out

    def base(call):
        with net.disable_adapter():
            return call(ids, mask)

    forward = lambda x, m, **kw: net(input_ids=x, attention_mask=m, **kw).logits  # noqa: E731
    generate = lambda x, m, **kw: net.generate(input_ids=x, attention_mask=m, **gen, **kw)  # noqa: E731
    with torch.inference_mode():
        mixed_logits = forward(ids, mask, adapter_names=entries)
        diff = (mixed_logits - torch.cat(separate(forward))).abs().max().item()
        base_diff = (mixed_logits - base(forward)).abs().max().item()
    jobs = {
        "base model (adapters disabled)": {"forward": lambda: base(forward), "generate": lambda: base(generate)},
        "mixed batch (4 adapters)": {"forward": lambda: forward(ids, mask, adapter_names=entries),
                                     "generate": lambda: generate(ids, mask, adapter_names=entries)},
        "4 separate batches": {"forward": lambda: separate(forward), "generate": lambda: separate(generate)},
    }
    timings = Timings()
    with torch.inference_mode():
        run_interleaved(jobs, {n: args.reps for n in jobs}, {n: 1 for n in jobs}, timings)
    ref = {what: timings.median_ms(f"4 separate batches/{what}") for what in ("forward", "generate")}
    rows = []
    for name in jobs:
        fwd, gen_ms = timings.median_ms(f"{name}/forward"), timings.median_ms(f"{name}/generate")
        rows.append([name, fmt_ms(fwd), f"{args.rows * args.tokens / fwd * 1000:,.0f}", ratio(ref["forward"], fwd),
                     fmt_ms(gen_ms), f"{args.rows * args.new_tokens / gen_ms * 1000:,.1f}",
                     ratio(ref["generate"], gen_ms)])
    lines = header_lines(["transformers"]) + [
        f"model: {described}; adapters: {', '.join(names)} (r = {args.r}, q_proj/v_proj); {args.rows} rows × "
        f"{args.tokens} tokens, {per} rows per adapter; generate: greedy, {args.new_tokens} new tokens per row; "
        f"medians of {args.reps}",
        f"check: max |mixed − separate| over the logits = {diff:.2e} (mixed − base: {base_diff:.2e})",
        "",
        *markdown_table(["variant", "forward ms", "forward tokens/s", "speed vs separate", "generate ms",
                         "generated tokens/s", "speed vs separate"], rows, right={1, 2, 3, 4, 5, 6}),
    ]
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
