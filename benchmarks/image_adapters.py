"""HRA vs LoRA vs HydraLoRA vs MTLoRA on the image recipes of the embedded ``tiny-digits`` model, same budget.

For each method and seed, two ``peftlab train`` runs (through :func:`peftlab.recipes.train`):

* ``subject-driven``: DreamBooth with prior preservation on ``glyph:K`` (6 renderings of the unseen letter K in
  one font); reported: subject similarity (stand-in for DINO) after training, the glyph classifier's accuracy on
  "a handwritten digit k" samples before / after (forgetting of the prior), trainable parameters, s/step;
* ``controllable``: a condition encoder + the method's UNet adapters on ``tiny-digits-edges`` (``--control``:
  canny, the default, or segmentation); reported: edge F1 and edge SSIM between the control and the output's
  edges (canny) or the SSIM between the control and the output's segmentation map (segmentation), before /
  after, class accuracy, parameters, s/step.

Every method gets the same steps, batch size, rank and data; its learning rate is the image tasks' default
(``--lr`` overrides it for all). Each run's metrics are kept in ``--results`` (JSON), so a stopped benchmark
resumes where it stopped. ``--extra hra:1e-2`` adds runs of a method at another lr (the subject task only).
Prints a Markdown table (mean ± std over seeds) and writes a small grid of samples (``--grid``).

    .venv/bin/python benchmarks/image_adapters.py --seeds 3 --subject-steps 300 --control-steps 400 \\
        --grid docs/image-adapters-samples.png --out runs/image-adapters/report.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from _harness import add_run_options, apply_run_options, emit_report, header_lines, markdown_table

from peftlab.files import atomic_write_bytes, atomic_write_json
from peftlab.recipes import RunOptions, train

METHODS = ("hra", "lora", "hydralora", "mtlora")
TILE = 32


CONTROL_METRICS = {"canny": (("edge_f1", "edge F1"), ("edge_ssim", "edge SSIM")),
                   "segmentation": (("segmentation_ssim", "segmentation SSIM"),)}


def run_kind(task: str, control: str, encoder: str = "hint") -> str:
    """The task, with the control when it is not canny and the control encoder when it is not the hint encoder
    (canny hint runs keep the keys and folders they had before ``--control`` / ``--control-encoder`` existed)."""
    if task != "controllable":
        return task
    return task + (f"-{control}" if control != "canny" else "") + (f"-{encoder}" if encoder != "hint" else "")


def run_key(task: str, method: str, seed: int, steps: int, lr: float | None, control: str = "canny",
            encoder: str = "hint") -> str:
    """The run's key in the results cache."""
    return (f"{run_kind(task, control, encoder)}/{method}/seed{seed}/steps{steps}/"
            f"lr{lr if lr is not None else 'default'}")


def run_once(task: str, method: str, seed: int, steps: int, lr: float | None, work: Path,
             control: str = "canny", encoder: str = "hint") -> dict[str, Any]:
    """One training run; the metrics it writes."""
    folder = work / f"{run_kind(task, control, encoder)}-{method}-lr{lr or 'default'}-steps{steps}-s{seed}"
    controllable = task == "controllable"
    options = RunOptions(task=task, method=method, seed=seed, max_steps=steps, lr=lr, output_dir=str(folder),
                         overwrite=True, control=control if controllable else None,
                         control_encoder=encoder if controllable else None)
    start = time.perf_counter()
    metrics = train(options)
    return {**metrics, "wall_s": round(time.perf_counter() - start, 1), "folder": str(folder)}


def mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def column(runs: list[dict[str, Any]], path: tuple[str, ...]) -> list[float]:
    out = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            out.append(float(value))
    return out


def subject_table(results: dict[str, Any], rows: list[tuple[str, float | None]], seeds: list[int],
                  steps: int) -> list[str]:
    body = []
    for method, lr in rows:
        runs = [results[k] for s in seeds if (k := run_key("subject-driven", method, s, steps, lr)) in results]
        if not runs:
            continue
        body.append([f"{method}" + (f" (lr {lr:g})" if lr else ""), f"{runs[0]['lr'] if 'lr' in runs[0] else '-'}",
                     str(len(runs)), mean_std(column(runs, ("test", "subject_similarity"))),
                     mean_std(column(runs, ("before", "prior_class_accuracy"))),
                     mean_std(column(runs, ("test", "prior_class_accuracy"))),
                     f"{int(runs[0]['trainable_params']):,}", mean_std(column(runs, ("seconds_per_step",)))])
    header = ["method", "lr", "seeds", "subject similarity ↑", "prior acc. before", "prior acc. after ↑",
              "trainable params", "s/step"]
    return markdown_table(header, body, right=set(range(1, len(header))))


def control_table(results: dict[str, Any], seeds: list[int], steps: int, control: str = "canny",
                  encoder: str = "hint") -> list[str]:
    metrics = CONTROL_METRICS[control]
    body = []
    for method in METHODS:
        runs = [results[k] for s in seeds if (k := run_key("controllable", method, s, steps, None, control, encoder))
                in results]
        if not runs:
            continue
        fidelity = [mean_std(column(runs, (when, key))) for key, _ in metrics for when in ("before", "test")]
        body.append([method, f"{runs[0].get('lr', '-')}", str(len(runs)), *fidelity,
                     mean_std(column(runs, ("before", "class_accuracy"))),
                     mean_std(column(runs, ("test", "class_accuracy"))),
                     f"{int(runs[0]['trainable_params']):,}", mean_std(column(runs, ("seconds_per_step",)))])
    header = ["method", "lr", "seeds", *(f"{label} {when}" for _, label in metrics for when in ("before", "after ↑")),
              "class acc. before", "class acc. after", "trainable params (incl. encoder)", "s/step"]
    return markdown_table(header, body, right=set(range(1, len(header))))


def first_tiles(png: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` 32×32 tiles (row by row) of a run's ``samples.png`` grid, grey in [0, 1]."""
    from PIL import Image

    grid = np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255.0
    cols = grid.shape[1] // TILE
    return [grid[(i // cols) * TILE:(i // cols + 1) * TILE, (i % cols) * TILE:(i % cols + 1) * TILE]
            for i in range(count)]


def sample_grid(results: dict[str, Any], seed: int, steps: tuple[int, int], path: Path, per_task: int = 4,
                control: str = "canny", encoder: str = "hint") -> None:
    """One row per method: ``per_task`` subject samples (when those runs exist), then ``per_task`` control samples;
    on top the instance images and the controls of those samples. A grey PNG with 2-pixel grey gaps."""
    from PIL import Image

    from peftlab.data import glyphs
    from peftlab.recipes.image.data import held_out_edges

    subject = any(run_key("subject-driven", m, seed, steps[0], None) in results for m in METHODS)
    controls = list(glyphs.to_array(held_out_edges(control, TILE, per_task).controls))
    rows = [(list(glyphs.subject_images("K", per_task)) if subject else []) + controls]
    for method in METHODS:
        keys = ((run_key("subject-driven", method, seed, steps[0], None),) if subject else ()) + (
            run_key("controllable", method, seed, steps[1], None, control, encoder),)
        if all(k in results for k in keys):
            rows.append([t for k in keys for t in first_tiles(Path(results[k]["folder"]) / "samples.png", per_task)])
    pad, n = 2, len(rows[0])
    canvas = np.full((len(rows) * (TILE + pad) + pad, n * (TILE + pad) + pad), 0.5, np.float32)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas[pad + r * (TILE + pad): pad + r * (TILE + pad) + TILE,
                   pad + c * (TILE + pad): pad + c * (TILE + pad) + TILE] = tile
    import io

    buffer = io.BytesIO()
    Image.fromarray((canvas * 255).round().astype(np.uint8), mode="L").save(buffer, "PNG", optimize=True)
    atomic_write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--subject-steps", type=int, default=300, help="optimizer steps of each subject run")
    parser.add_argument("--control-steps", type=int, default=400, help="optimizer steps of each controllable run")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--tasks", default="subject-driven,controllable", help="comma-separated tasks")
    parser.add_argument("--control", default="canny", choices=sorted(CONTROL_METRICS),
                        help="the controllable task's control (default canny)")
    parser.add_argument("--control-encoder", default="hint", choices=["hint", "controlnet"],
                        help="the controllable task's condition path (default hint)")
    parser.add_argument("--extra", default="", help="METHOD:LR pairs run on the subject task too, e.g. hra:1e-2")
    parser.add_argument("--work", type=Path, default=Path("runs/image-adapters"), help="run folders")
    parser.add_argument("--results", type=Path, help="per-run JSON cache (default WORK/results.json)")
    parser.add_argument("--grid", type=Path, help="write a grid of samples (seed 0) as a PNG")
    add_run_options(parser)
    args = parser.parse_args()
    apply_run_options(args)
    results_path = args.results or args.work / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    seeds = list(range(args.seeds))
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    extra = [(m, float(lr)) for m, _, lr in (e.partition(":") for e in args.extra.split(",") if e)]
    plan = [(task, method, seed, None) for seed in seeds for task in tasks for method in methods]
    plan += [("subject-driven", method, seed, lr) for seed in seeds for method, lr in extra]
    lines = header_lines(["diffusers", "transformers", "accelerate"], busy_hint="s/step is wall time")
    start = time.perf_counter()
    for i, (task, method, seed, lr) in enumerate(plan, 1):
        steps = args.subject_steps if task == "subject-driven" else args.control_steps
        key = run_key(task, method, seed, steps, lr, args.control, args.control_encoder)
        if key in results:
            continue
        print(f"[{i}/{len(plan)}] {key}", flush=True)
        results[key] = run_once(task, method, seed, steps, lr, args.work, args.control, args.control_encoder)
        atomic_write_json(results_path, results)
    lines += ["", f"total wall time of this invocation: {time.perf_counter() - start:.0f} s "
              f"({len(results)} runs in {results_path})", ""]
    if "subject-driven" in tasks:
        lines += [f"subject-driven (glyph:K, {args.subject_steps} steps, batch 4 instance + 4 class images, r 8):", ""]
        lines += subject_table(results, [(m, None) for m in methods] + extra, seeds, args.subject_steps) + [""]
    if "controllable" in tasks:
        lines += [f"controllable (tiny-digits-edges, {args.control}, {args.control_encoder} encoder, "
                  f"{args.control_steps} steps, batch 8, r 8):", ""]
        lines += control_table(results, seeds, args.control_steps, args.control, args.control_encoder)
    if args.grid:
        sample_grid(results, seeds[0], (args.subject_steps, args.control_steps), args.grid, control=args.control,
                    encoder=args.control_encoder)
        lines += ["", f"wrote {args.grid} ({args.grid.stat().st_size:,} bytes)"]
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
