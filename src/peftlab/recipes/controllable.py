"""Controllable generation (the OFT / HRA setting): a condition encoder plus a method's UNet adapters.

    peftlab train --task controllable --model tiny-digits --data tiny-digits-edges --control canny --method hra

A zero-initialised :class:`~peftlab.diffusion.control.ConditionEncoder` E_φ turns the control image c into
features added to the UNet's first feature map, h₀ = conv_in(z_t) + E_φ(c) (a forward hook, see
:mod:`peftlab.diffusion.conditioning`), so training starts exactly at the base model. E_φ and the method's
adapters on the UNet (and the text encoder with ``--train-text-encoder``) are trained together on

    L = E‖ε − ε_θ(x_t, t, τ(caption), E_φ(c))‖²

where the caption is replaced by "" with probability 0.5 (as ControlNet trains, so that the control, not
the caption, must carry the image's layout), and c is computed from the target x when the data has no control
images (canny edges, dlib landmarks, or the multi-Otsu segmentation stand-in; see
:mod:`peftlab.diffusion.control`). The encoder is saved with the adapters (``condition_encoder/``,
safetensors), and ``peftlab generate --adapter RUN --control IMG`` loads it back.

Metrics, sampled with the same seeds before (the base, which ignores the control) and after training, on
``--num-eval-images`` controls (held-out digits for ``tiny-digits-edges``, else the first training examples):
``edge_f1`` / ``edge_ssim`` between the control and the output's edges (canny; ``segmentation_ssim`` or
``landmark_error`` for the others; :func:`peftlab.diffusion.image_metrics.control_fidelity`) and, when the
data are glyphs, ``class_accuracy`` of the outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from peftlab.diffusion.control import control_tensor
from peftlab.recipes import image_data
from peftlab.recipes import image_training as it
from peftlab.recipes.options import RunOptions
from peftlab.recipes.rundir import owns_output_dir, start_output_dir
from peftlab.recipes.scale import unet_training
from peftlab.recipes.training import log

CAPTION_DROPOUT = 0.5  # ControlNet (Zhang et al. 2023): half the captions are "", so the control must be used
METRIC_BY_CONTROL = {"canny": "edge_f1", "segmentation": "segmentation_ssim", "landmarks": "landmark_error"}


def prepare(options: RunOptions) -> dict[str, Any]:
    """Everything checked and loaded before the run folder is touched: the base pipeline, the examples and their
    control maps, the evaluation controls."""
    data = image_data.check_data_option(options.data)
    pipe = it.load_base(options)
    size = it.resolution(pipe, options)
    examples = image_data.control_examples(data, options.control, size, options.max_train_samples, options.seed)
    captions = sorted(set(examples.captions))
    it.check_prompts(pipe, {f"--data caption {c[:40]!r}": c for c in captions if c.strip()})
    if data == image_data.EDGES_DATA:
        held_out = image_data.held_out_edges(options.control, size, options.num_eval_images)
    else:
        held_out = examples.take(list(range(min(options.num_eval_images, len(examples)))))
    return {"pipe": pipe, "size": size, "examples": examples, "held_out": held_out}


def evaluate_samples(pipe: Any, options: RunOptions, size: int, held_out: image_data.ControlExamples,
                     control: bool) -> tuple[dict[str, float], dict[str, str], list[Any]]:
    """(values, skipped, samples): how well samples for the held-out captions follow their controls."""
    from peftlab.diffusion import image_metrics as im

    controls = control_tensor(held_out.controls, size) if control else None
    samples = it.sample_images(pipe, held_out.captions, options, size, options.seed, controls)
    result = im.control_fidelity(samples, held_out.controls, options.control)
    if held_out.labels is not None:
        result.values["class_accuracy"] = im.class_accuracy(samples, held_out.labels)
    else:
        result.skipped["class_accuracy"] = "the data have no glyph labels (tiny-digits-edges has)"
    return result.values, result.skipped, samples


def control_sampler(pipe: Any, examples: image_data.ControlExamples, controls: torch.Tensor, batch_size: int,
                    generator: torch.Generator) -> Any:
    """``sample()`` of the controllable objective: ``batch_size`` examples (weight 1/batch) with their ``controls``
    (the encoder's input, one per example), each caption replaced by "" with probability :data:`CAPTION_DROPOUT`,
    and fresh noise, all drawn from ``generator``."""
    latents = it.latents_of(pipe, image_data.pixels(examples.targets))
    ids = it.token_ids(pipe, examples.captions)
    empty = it.token_ids(pipe, [""])[0]
    return it.example_sampler(latents, ids, torch.ones(len(latents)), batch_size, generator,
                              pipe.scheduler.config.num_train_timesteps, controls, (empty, CAPTION_DROPOUT))


def add_adapters(pipe: Any, options: RunOptions, ready: dict[str, Any]) -> dict[str, Any]:
    """The method's adapters on the pipeline of ``prepare`` (what :func:`train` and
    :func:`peftlab.recipes.scale.plan` put on it)."""
    return it.add_adapters(pipe, options, options.train_text_encoder, sorted(set(ready["examples"].captions)))


@owns_output_dir
def train(options: RunOptions, checkpoint: str | None = None) -> dict[str, Any]:
    """Train the condition encoder and ``options.method``'s adapters; returns the metrics (also ``metrics.json``)."""
    from accelerate.utils import set_seed

    from peftlab.diffusion.conditioning import attach_condition_encoder, new_condition_encoder

    set_seed(options.seed)
    ready = prepare(options)
    pipe, size, examples = ready["pipe"], ready["size"], ready["examples"]
    before, _, _ = evaluate_samples(pipe, options, size, ready["held_out"], control=False)
    out = start_output_dir(options)
    set_seed(options.seed)
    models = add_adapters(pipe, options, ready)
    encoder = new_condition_encoder(pipe)
    hook = attach_condition_encoder(pipe, encoder)
    generator = torch.Generator().manual_seed(options.seed)
    sample = control_sampler(pipe, examples, control_tensor(examples.controls, size), options.batch_size, generator)
    log(f"training {options.method} + a condition encoder on {len(examples)} {options.control} examples of "
        f"{options.data}, {options.max_steps} steps")
    with unet_training(pipe, models, options):  # --gradient-checkpointing, --torch-compile
        training = it.fit(pipe, [m.base_model for m in models.values()] + [encoder], sample, options, hook=hook,
                          out=out, checkpoint=checkpoint, generator=generator)
    hook.control = None
    after, skipped, samples = evaluate_samples(pipe, options, size, ready["held_out"], control=True)
    metrics = {
        "task": options.task, "method": options.method, "model": options.model, "data": options.data, "lr": options.lr,
        "control": options.control, "metric": METRIC_BY_CONTROL[options.control], "num_examples": len(examples),
        "num_eval_images": len(ready["held_out"]), "test": after, "before": before, "skipped": skipped,
        "condition_encoder_params": sum(p.numel() for p in encoder.parameters()),
        **{k: v for k, v in training.items() if k != "losses"},
    }
    it.finish_image_run(pipe, out, metrics, samples, training["losses"], options.keep_checkpoints)
    keys = ("edge_f1", "edge_ssim", "segmentation_ssim", "landmark_error", "class_accuracy")
    log(f"controllable {options.method}: {it.summary(metrics, keys)}; {training['trainable_params']:,} trainable "
        f"parameters, {training['seconds_per_step']:.3f} s/step; wrote {out}")
    return metrics


def evaluate(folder: Any, options: RunOptions, split: str, max_samples: int | None) -> dict[str, Any]:
    """``peftlab eval`` of a controllable run: the metrics written at the end of training."""
    return it.saved_metrics(folder)
