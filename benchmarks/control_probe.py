"""Does a controllable model use its control? Held-out denoising loss with each image's own control vs a shuffled one.

Sampled metrics (edge F1) move only once the control changes what is drawn; this probe sees smaller effects. For
held-out digits x with control c (and caption), fixed noise ε and timesteps t ∈ {200, 400, 600, 800}:

    gap = (L(shuffled c) − L(own c)) / L(own c),   L = mean ‖ε − ε_θ(x_t, t, τ(caption), E_φ(c))‖²

A model that ignores the control has gap 0; one that uses it has gap > 0. Two modes:

* default: train the condition encoder (``--encoder hint``, or ``controlnet``) **alone** (frozen UNet, no
  adapters) on ``tiny-digits-edges`` with the recipe's own loop (:func:`peftlab.recipes.image.training.fit`: AdamW,
  warm-up + linear decay, clipping 1.0, the recipe's 50 % caption dropout) and report the gap before and after.
  ``--control target`` gives the encoder the target image itself (an upper bound: the most informative control
  there is);
* ``--run RUN``: probe a trained controllable run (its adapters and encoder) on the same held-out digits.

    .venv/bin/python benchmarks/control_probe.py --control canny --steps 400
    .venv/bin/python benchmarks/control_probe.py --control target --steps 400
    .venv/bin/python benchmarks/control_probe.py --run runs/edges
    .venv/bin/python benchmarks/control_probe.py --control canny --steps 400 --encoder controlnet
    .venv/bin/python benchmarks/control_probe.py --edge-f1-range    # no model: the range edge F1 can take
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _harness import emit_report, header_lines, markdown_table

from peftlab.diffusion.conditioning import (
    attach_condition_encoder,
    condition_hook,
    new_condition_encoder,
    new_controlnet,
)
from peftlab.diffusion.control import control_tensor
from peftlab.recipes.image import data as image_data
from peftlab.recipes.image import training as image_training
from peftlab.recipes.image.controllable import control_sampler
from peftlab.recipes.options import RunOptions

TIMESTEPS = (200, 400, 600, 800)
SIZE = 32


def controls_of(examples: image_data.ControlExamples, control: str) -> torch.Tensor:
    """The encoder's input: the control maps, or (``target``) the target images themselves."""
    return control_tensor(examples.targets if control == "target" else examples.controls, SIZE)


def held_out_inputs(pipe: Any, held_out: image_data.ControlExamples) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out targets' latents and caption token ids (the frozen VAE and tokenizer: the same before and after
    training)."""
    latents = image_training.latents_of(pipe, image_data.pixels(held_out.targets))
    return latents, image_training.token_ids(pipe, held_out.captions)


def probe(pipe: Any, latents: torch.Tensor, ids: torch.Tensor, controls: torch.Tensor) -> dict[str, float]:
    """Mean held-out loss over :data:`TIMESTEPS` with the own and with shuffled controls, and the relative gap
    (``latents``, ``ids``: the held-out targets' latents and caption token ids)."""
    hook = condition_hook(pipe)
    scheduler = image_training.noise_scheduler(pipe)
    n = len(latents)
    shuffled = controls[torch.roll(torch.arange(n), 1)]  # every example gets another one's control
    losses = {"own": 0.0, "shuffled": 0.0}
    for t in TIMESTEPS:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
        for name, control in (("own", controls), ("shuffled", shuffled)):
            batch = image_training.Batch(latents, ids, torch.full((n,), 1 / n), control, noise, torch.full((n,), t))
            with torch.no_grad():
                losses[name] += image_training.denoising_loss(pipe, scheduler, batch, hook).item() / len(TIMESTEPS)
    return {**losses, "gap": (losses["shuffled"] - losses["own"]) / losses["own"]}


def edge_f1_range(held_out: image_data.ControlExamples) -> list[list[str]]:
    """How far edge F1 (1-pixel tolerance, as the recipe scores samples) can move on these digits, without a model:
    edge F1 and edge SSIM against each digit's canny control of the target itself, of the target shifted, blurred or
    thickened, of another digit of the same class (what a model that follows only the caption draws at best) and of
    another class."""
    import numpy as np
    from scipy.ndimage import gaussian_filter, shift

    from peftlab.data import glyphs
    from peftlab.diffusion.image_metrics import control_fidelity

    targets = glyphs.to_array(held_out.targets, None)
    n = len(targets)  # held_out_edges gives the classes in turn: index i + 10 is another digit of i's class
    cases = {
        "the target itself": targets,
        "the target shifted 1 px": np.stack([shift(t, (0, 1), order=1) for t in targets]),
        "the target shifted 2 px": np.stack([shift(t, (0, 2), order=1) for t in targets]),
        "the target blurred (Gaussian σ = 1 px)": np.stack([gaussian_filter(t, 1.0) for t in targets]),
        "the target with thicker ink (× 1.5, clipped)": np.clip(targets * 1.5, 0, 1),
        "another digit of the same class": targets[(np.arange(n) + 10) % n],
        "a digit of another class": targets[(np.arange(n) + 1) % n],
        "a blank image": np.zeros_like(targets),
    }
    rows = []
    for name, images in cases.items():
        values = control_fidelity(np.clip(images, 0, 1), held_out.controls, "canny").values
        rows.append([name, f"{values['edge_f1']:.3f}", f"{values['edge_ssim']:.3f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--control", default="canny", choices=["canny", "segmentation", "target"],
                        help="the encoder's input (default canny; target: the target image itself)")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the encoder (default 400)")
    parser.add_argument("--lr", type=float, default=3e-3, help="the encoder's lr (default 3e-3, the recipe's)")
    parser.add_argument("--encoder", default="hint", choices=["hint", "controlnet"],
                        help="the condition path trained (default hint; controlnet: --control-encoder controlnet)")
    parser.add_argument("--edge-f1-range", action="store_true",
                        help="no model: how far edge F1 can move on the held-out digits (shifted, blurred, other "
                             "digits)")
    parser.add_argument("--run", help="probe this trained controllable run instead of training an encoder")
    parser.add_argument("--held-out", type=int, default=100, help="held-out digits (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the report to this Markdown file")
    args = parser.parse_args()

    from peftlab.diffusion.pipeline import load_pipeline_adapters, with_control_encoder

    map_type = "canny" if args.control == "target" else args.control
    held_out = image_data.held_out_edges(map_type, SIZE, args.held_out)
    held = controls_of(held_out, args.control)
    rows: list[list[str]] = []
    if args.edge_f1_range:
        lines = header_lines() + [f"edge F1 / SSIM against the canny controls of {args.held_out} held-out digits", "",
                                  *markdown_table(["output", "edge F1", "edge SSIM"], edge_f1_range(held_out),
                                                  right={1, 2})]
        emit_report(lines, Path(args.out) if args.out else None)
        return
    if args.run:
        pipe = load_pipeline_adapters(args.run)
        result = probe(pipe, *held_out_inputs(pipe, held_out), held)
        rows.append([args.run, "—", f"{result['own']:.4f}", f"{result['shuffled']:.4f}", f"{result['gap']:+.3%}"])
        setting = f"trained run {args.run}, {args.control} controls"
    else:
        options = RunOptions(task="controllable", method="lora", seed=args.seed, max_steps=args.steps, lr=args.lr,
                             output_dir="unused").resolved()
        torch.manual_seed(args.seed)
        pipe = image_training.load_base(options)
        if args.encoder == "controlnet":
            pipe = with_control_encoder(pipe, new_controlnet(pipe))
            encoder = pipe.controlnet
        else:
            encoder = new_condition_encoder(pipe)
            attach_condition_encoder(pipe, encoder)
        examples = image_data.control_examples("tiny-digits-edges", map_type, SIZE, options.max_train_samples,
                                               args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        sample = control_sampler(pipe, examples, controls_of(examples, args.control), options.batch_size, generator)
        inputs = held_out_inputs(pipe, held_out)
        before = probe(pipe, *inputs, held)
        start = time.perf_counter()
        training = image_training.fit(pipe, [encoder], sample, options, hook=condition_hook(pipe), progress=False)
        wall = time.perf_counter() - start
        after = probe(pipe, *inputs, held)
        for label, result in (("before (E_φ = 0)", before), (f"after {args.steps} steps", after)):
            rows.append([label, f"{training['final_loss']:.4f}" if label.startswith("after") else "—",
                         f"{result['own']:.4f}", f"{result['shuffled']:.4f}", f"{result['gap']:+.3%}"])
        setting = (f"{args.encoder} condition encoder alone ({sum(p.numel() for p in encoder.parameters()):,} "
                   f"parameters), {args.control} controls, {args.steps} steps × batch "
                   f"{options.batch_size}, lr {args.lr}, {len(examples)} training digits, {wall:.0f} s")
    lines = header_lines() + [
        f"setting: {setting}; {args.held_out} held-out digits, t ∈ {list(TIMESTEPS)}",
        "",
        *markdown_table(["model", "final train loss", "loss, own control", "loss, shuffled control", "gap"], rows,
                        right={1, 2, 3, 4}),
    ]
    emit_report(lines, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
