"""HydraLoRA head mixing: the one-GEMM form against a Python loop over heads.

Both compute Δy = Σ_i ω_i · B_i · h for h = A·x (..., r), router weights ω (..., N) and heads B (N, d_out, r):

- one GEMM: ``peftlab.methods.hydralora.mix_heads`` = [B_1 … B_N] · (ω ⊗ h)
- loop:     Σ_i ω_i[..., None] * (h @ B_iᵀ)

For N ∈ {2, 4, 8} it prints the median forward+backward time of each (``--reps`` repetitions after 3
discarded ones, the two forms alternating, one run; ``_harness.run_interleaved``) and the ratio
loop / one-GEMM, after checking both give the same values.

    .venv/bin/python benchmarks/hydralora_heads.py [--tokens 2048] [--dim 1024] [--r 8] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from _harness import (
    Timings,
    add_run_options,
    apply_run_options,
    fmt_ms,
    header_lines,
    markdown_row,
    markdown_table,
    parse_ints,
    ratio,
    run_interleaved,
)

from peftlab.methods.hydralora import mix_heads


def loop_heads(h: torch.Tensor, weights: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    return sum(weights[..., i : i + 1] * (h @ heads[i].t()) for i in range(heads.shape[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--heads", type=parse_ints, default=[2, 4, 8], help="N values, comma-separated (default 2,4,8)")
    parser.add_argument("--reps", type=int, default=15, help="kept repetitions after 3 discarded ones (default 15)")
    add_run_options(parser, out=False)
    args = parser.parse_args()
    apply_run_options(args)
    print("\n".join(header_lines()))
    print(f"tokens={args.tokens}, d_out={args.dim}, r={args.r}\n")
    header = ["N", "one GEMM fwd+bwd ms", "loop fwd+bwd ms", "loop / one GEMM"]
    print("\n".join(markdown_table(header, [], right={0, 1, 2, 3})))
    for n in args.heads:
        torch.manual_seed(n)
        h = torch.randn(args.tokens, args.r, requires_grad=True)
        w = torch.softmax(torch.randn(args.tokens, n), -1).requires_grad_(True)
        b = torch.randn(n, args.dim, args.r, requires_grad=True)
        assert torch.allclose(mix_heads(h, w, b), loop_heads(h, w, b), atol=1e-4)

        def cleanup(_: str, h=h, w=w, b=b) -> None:
            h.grad = w.grad = b.grad = None

        jobs = {
            name: {"fwd_bwd": lambda fn=fn, h=h, w=w, b=b: fn(h, w, b).square().sum().backward()}
            for name, fn in (("gemm", mix_heads), ("loop", loop_heads))
        }
        timings = Timings()
        run_interleaved(jobs, {"gemm": args.reps, "loop": args.reps}, {"gemm": 3, "loop": 3}, timings, cleanup)
        gemm, loop = timings.median_ms("gemm/fwd_bwd"), timings.median_ms("loop/fwd_bwd")
        print(markdown_row([str(n), fmt_ms(gemm), fmt_ms(loop), ratio(loop, gemm)]))


if __name__ == "__main__":
    main()
