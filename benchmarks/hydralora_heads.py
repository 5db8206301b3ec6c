"""HydraLoRA head mixing: the one-GEMM form against a Python loop over heads.

Both compute Δy = Σ_i ω_i · B_i · h for h = A·x (..., r), router weights ω (..., N) and heads B (N, d_out, r):

- one GEMM: ``peftlab.methods.hydralora.mix_heads`` = [B_1 … B_N] · (ω ⊗ h)
- loop:     Σ_i ω_i[..., None] * (h @ B_iᵀ)

For N ∈ {2, 4, 8} it prints the median forward+backward time of each (interleaved repetitions, one
run) and the ratio loop / one-GEMM, after checking both give the same values.

    .venv/bin/python benchmarks/hydralora_heads.py [--tokens 2048] [--dim 1024] [--r 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from peftlab.methods.hydralora import mix_heads


def loop_heads(h: torch.Tensor, weights: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    return sum(weights[..., i : i + 1] * (h @ heads[i].t()) for i in range(heads.shape[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--heads", default="2,4,8")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"torch {torch.__version__}, {args.threads} threads, tokens={args.tokens}, d_out={args.dim}, r={args.r}\n")
    print("| N | one GEMM fwd+bwd ms | loop fwd+bwd ms | loop / one GEMM |")
    print("| ---: | ---: | ---: | ---: |")
    for n in (int(v) for v in args.heads.split(",")):
        torch.manual_seed(n)
        h = torch.randn(args.tokens, args.r, requires_grad=True)
        w = torch.softmax(torch.randn(args.tokens, n), -1).requires_grad_(True)
        b = torch.randn(n, args.dim, args.r, requires_grad=True)
        assert torch.allclose(mix_heads(h, w, b), loop_heads(h, w, b), atol=1e-4)
        times: dict[str, list[float]] = {"gemm": [], "loop": []}
        for rep in range(args.reps + 3):
            for name, fn in (("gemm", mix_heads), ("loop", loop_heads))[:: 1 if rep % 2 else -1]:
                start = time.perf_counter()
                fn(h, w, b).square().sum().backward()
                if rep >= 3:
                    times[name].append(time.perf_counter() - start)
        gemm, loop = (1000 * statistics.median(times[k]) for k in ("gemm", "loop"))
        print(f"| {n} | {gemm:.1f} | {loop:.1f} | {loop / gemm:.2f}× |")


if __name__ == "__main__":
    main()
