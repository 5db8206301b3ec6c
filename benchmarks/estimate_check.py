"""``peftlab estimate`` against measurement: peak memory of a real training step on the CPU.

For small random Llama configs (2-4 layers, vocab 8k-32k), each method, fp32 / bf16 and gradient checkpointing
on / off, one forward + backward + AdamW step is measured (after a warm-up step) as the peak of live tensor
bytes (torch.profiler, ``profile_memory=True``: the storages alive before the step plus the highest running
sum of allocations and frees in it) and printed next to :func:`peftlab.estimate.estimate_memory` and the
ratio estimate / measured. Goal: within 20 %. ::

    python benchmarks/estimate_check.py --out /tmp/estimate_check.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _harness as h

from peftlab.estimate import estimate_memory
from peftlab.estimate_model import measured_peak, measured_unet_peak

LLAMA = {"model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 512, "tie_word_embeddings": False}
SMALL = {**LLAMA, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "vocab_size": 8000}
WIDER = {**LLAMA, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "vocab_size": 32000}
# a small Stable-Diffusion-like UNet: 2 blocks (32, 64 channels), cross-attention on 32-wide text states
UNET = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "cross_attention_dim": 32,
        "sample_size": 32, "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 8, "in_channels": 4,
        "out_channels": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
# (name, config, method, r, batch, length (UNet: latent side), precision, checkpointing)
CASES = [
    ("small", SMALL, "lora", 8, 4, 256, "fp32", False),
    ("small", SMALL, "hra", 8, 4, 256, "fp32", True),
    ("small", SMALL, "hydralora", 8, 4, 256, "bf16", False),
    ("small", SMALL, "lora", 8, 4, 256, "bf16", True),
    ("wider", WIDER, "hra", 16, 2, 128, "fp32", False),
    ("wider", WIDER, "lora", 16, 2, 128, "bf16", False),
    ("wider", WIDER, "hydralora", 16, 2, 128, "bf16", True),
    ("wider", WIDER, "lora", 16, 4, 256, "fp32", True),
    ("unet", UNET, "hra", 4, 2, 32, "fp32", False),
    ("unet", UNET, "lora", 4, 4, 32, "fp32", False),
]


def check(config: dict, method: str, r: int, batch: int, length: int, precision: str, ckpt: bool,
          folder: Path) -> tuple[int, int]:
    """(estimated total bytes, measured peak bytes) of one case."""
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    estimate = estimate_memory(path, method, r, batch_size=batch, seq_len=length, precision=precision,
                               gradient_checkpointing=ckpt, resolution=8 * length)
    if "block_out_channels" in config:
        return estimate.total, measured_unet_peak(config, method, r, batch)
    return estimate.total, measured_peak(config, method, r, batch, length, precision, ckpt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_run_options(parser)
    args = parser.parse_args(argv)
    h.apply_run_options(args)
    lines = [*h.header_lines(["transformers"])]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, config, method, r, batch, length, precision, ckpt in CASES:
            start = time.perf_counter()
            estimated, measured = check(config, method, r, batch, length, precision, ckpt, Path(folder))
            ratio = estimated / measured
            print(f"{name} {method} {precision} ckpt={ckpt}: estimate {h.fmt_mb(estimated)}, measured "
                  f"{h.fmt_mb(measured)}, ratio {ratio:.2f} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
            what = "UNet (32, 64 channels)" if name == "unet" else (
                f"{name} (h {config['hidden_size']}, {config['num_hidden_layers']} layers, V {config['vocab_size']})")
            size = f"{batch} × {length}" if name != "unet" else f"{batch} × {length}² latents"
            rows.append([what, method, str(r), size, precision,
                         "on" if ckpt else "off", h.fmt_mb(estimated), h.fmt_mb(measured), f"{ratio:.2f}",
                         "yes" if abs(ratio - 1) <= 0.2 else "NO"])
    lines += h.markdown_table(["model", "method", "r", "batch", "precision", "checkpointing", "estimate",
                               "measured", "estimate / measured", "within 20 %"], rows, right={2, 6, 7, 8})
    h.emit_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
