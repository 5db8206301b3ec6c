"""The embedded text-to-image model ``tiny-digits``: pretraining time, size, and how recognisable its samples are.

Pretrains the model into peftlab's cache (``--force`` pretrains again even if it is cached; the wall and process
CPU time of that run are reported), then generates ``--per-class`` images for each prompt "a handwritten digit k"
(k = 0..9) and "a printed letter L" (the pretraining letters), ``--steps`` DDIM steps at each ``--guidance`` scale,
and scores them with the stand-in classifier (``peftlab.diffusion.image_metrics.class_accuracy``; chance is
1/36, the classifier knows digits and all letters). The first guidance scale's samples go to ``--grid``
(one row per prompt).

    .venv/bin/python benchmarks/tiny_digits.py [--force] [--grid docs/tiny-digits-samples.png] [--out report.md]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from _harness import add_run_options, apply_run_options, emit_report, header_lines, markdown_table

from peftlab.data import glyphs
from peftlab.diffusion import embedded, image_metrics
from peftlab.files import atomic_write_bytes


def grid_png(images: np.ndarray, columns: int, pad: int = 2) -> bytes:
    """(N, h, w, 3) images in [0, 1] tiled row by row with ``pad`` grey pixels between them, as a grey PNG (the
    channel mean: tiny-digits' images are grey, and one channel keeps the file small)."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 0.5, np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    buffer = io.BytesIO()
    Image.fromarray((canvas.mean(axis=-1) * 255).round().astype(np.uint8), mode="L").save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="pretrain again even if the model is cached")
    parser.add_argument("--cache-dir", type=Path, help="cache root (default $PEFTLAB_CACHE or ~/.cache/peftlab)")
    parser.add_argument("--per-class", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0, 7.5], help="guidance scales (default 4 7.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, help="write the samples of the first guidance scale as a PNG grid")
    add_run_options(parser)
    args = parser.parse_args()
    apply_run_options(args)
    lines = header_lines(["diffusers", "transformers"], busy_hint="compare the process CPU seconds")

    wall, cpu = time.perf_counter(), time.process_time()
    cached = embedded.model_dir(args.cache_dir).is_dir() and not args.force
    path = embedded.ensure_pretrained(args.cache_dir, force=args.force)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report = json.loads((path / embedded.REPORT_NAME).read_text())
    lines += ["", f"model: `{path}`", "reused from the cache (run with --force to time pretraining)" if cached else
              f"pretraining: {wall:.0f} s wall, {cpu:.0f} s process CPU ({torch.get_num_threads()} threads)",
              f"pretraining report: {report['seconds']}, {report['images']} images, VAE MSE {report['vae_mse']:.4f}, "
              f"final denoising loss {report['final_loss']:.4f}",
              "parameters: " + ", ".join(f"{k} {v:,}" for k, v in report["parameters"].items()), ""]

    pipe = embedded.load_pipeline(path)
    classes = list(glyphs.DIGITS) + list(report["config"]["letters"])
    prompts = [glyphs.caption(c) for c in classes for _ in range(args.per_class)]
    labels = [c for c in classes for _ in range(args.per_class)]
    table: dict[str, list[str]] = {c: [glyphs.caption(c)] for c in classes}
    summary = []
    for i, scale in enumerate(args.guidance):
        start = time.perf_counter()
        images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=scale, output_type="np",
                      generator=torch.Generator().manual_seed(args.seed)).images
        seconds = time.perf_counter() - start
        predicted = image_metrics.predict_classes(images)
        hits = predicted == np.array([glyphs.class_id(c) for c in labels])
        for j, c in enumerate(classes):
            table[c].append(f"{hits[j * args.per_class:(j + 1) * args.per_class].mean():.2f}")
        digits = hits[: 10 * args.per_class].mean()
        summary.append(f"guidance {scale}: digit accuracy {digits:.3f}, letter accuracy "
                       f"{hits[10 * args.per_class:].mean():.3f}, all {hits.mean():.3f} "
                       f"({len(images)} images, {seconds:.1f} s)")
        if i == 0 and args.grid:
            atomic_write_bytes(args.grid, grid_png(images, args.per_class))
            summary.append(f"wrote {args.grid} ({args.grid.stat().st_size:,} bytes)")
    lines += [f"stand-in classifier accuracy of generated images ({args.per_class} per prompt, {args.steps} DDIM "
              f"steps, seed {args.seed}; chance 1/36):", ""]
    lines += markdown_table(["prompt"] + [f"guidance {s}" for s in args.guidance], table.values(),
                            right=set(range(1, len(args.guidance) + 1)))
    lines += [""] + summary
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
