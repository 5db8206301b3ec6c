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

``--control-encoder controlnet`` replaces E_φ by a ControlNet (:func:`~peftlab.diffusion.conditioning.new_controlnet`:
a trainable copy of the base UNet's encoder, made before the adapters go on, whose zero-initialised outputs are
added to every skip connection and to the mid block): the pipeline becomes diffusers'
``StableDiffusionControlNetPipeline``, the ControlNet is saved in ``controlnet/`` (``save_pretrained``,
safetensors) and sampling passes the control as its ``image``.

Metrics, sampled with the same seeds before (the base, which ignores the control) and after training, on
``--num-eval-images`` controls (held-out digits for ``tiny-digits-edges``, else the first training examples):
``edge_f1`` / ``edge_ssim`` between the control and the output's edges (canny; ``segmentation_ssim`` or
``landmark_error`` for the others; :func:`peftlab.diffusion.image_metrics.control_fidelity`) and, when the
data are glyphs, ``class_accuracy`` of the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftlab.data import glyphs
from peftlab.diffusion.control import control_tensor
from peftlab.recipes.image import data as image_data
from peftlab.recipes.image.run import Objective, PreparedRun, Scores, evaluate, train_prepared
from peftlab.recipes.image.training import (
    check_prompts,
    example_sampler,
    latents_of,
    load_base,
    resolution,
    sample_images,
    token_ids,
)
from peftlab.recipes.options import RunOptions, sample_seed
from peftlab.recipes.rundir import owns_output_dir

CAPTION_DROPOUT = 0.5  # ControlNet (Zhang et al. 2023): half the captions are "", so the control must be used
CONTROLNET = "controlnet"  # --control-encoder controlnet: the pipeline's ControlNetModel component
METRIC_BY_CONTROL = {"canny": "edge_f1", "segmentation": "segmentation_ssim", "landmarks": "landmark_error"}


@dataclass
class ControlRun(PreparedRun):
    """A prepared controllable run: the training examples with their control maps, and the held-out controls."""

    examples: image_data.ControlExamples
    held_out: image_data.ControlExamples

    def metrics(self, options: RunOptions) -> dict[str, Any]:
        return {"data": options.data, "control": options.control, "metric": METRIC_BY_CONTROL[options.control],
                "num_examples": len(self.examples), "num_eval_images": len(self.held_out)}

    def score(self, options: RunOptions, trained: bool) -> Scores:
        # the untrained ControlNet adds exact zeros, so the base is scored through it (its pipeline needs an image)
        control = trained or CONTROLNET in self.pipe.components
        return evaluate_samples(self.pipe, options, self.size, self.held_out, control=control)

    def sample_prompts(self, options: RunOptions) -> list[str]:
        return list(self.held_out.captions)

    def objective(self, options: RunOptions, generator: torch.Generator) -> tuple[Objective, str]:
        from peftlab.diffusion.conditioning import attach_condition_encoder, new_condition_encoder

        hook = None
        if CONTROLNET in self.pipe.components:
            encoder = self.pipe.components[CONTROLNET]
        else:
            encoder = new_condition_encoder(self.pipe)
            hook = attach_condition_encoder(self.pipe, encoder)
        controls = control_tensor(self.examples.controls, self.size)
        sample = control_sampler(self.pipe, self.examples, controls, options.batch_size, generator)
        return (Objective(sample, [encoder], hook, {"control_encoder": options.control_encoder,
                                                    "condition_encoder_params": sum(p.numel() for p in
                                                                                   encoder.parameters())}),
                f"{len(self.examples)} {options.control} examples of {options.data}")


def prepare(options: RunOptions) -> ControlRun:
    """Everything checked and loaded before the run folder is touched: the base pipeline, the examples and their
    control maps, the evaluation controls."""
    data = image_data.check_data_option(options.data)
    pipe = load_base(options)
    if options.control_encoder == CONTROLNET:  # copied from the base UNet before any adapter is on it
        from peftlab.diffusion.conditioning import new_controlnet
        from peftlab.diffusion.pipeline import with_control_encoder

        pipe = with_control_encoder(pipe, new_controlnet(pipe))
        pipe.set_progress_bar_config(disable=True)
    size = resolution(pipe, options)
    examples = image_data.control_examples(data, options.control, size, options.max_train_samples, options.seed)
    captions = sorted(set(examples.captions))
    check_prompts(pipe, {f"--data caption {c[:40]!r}": c for c in captions if c.strip()})
    count, validation = options.num_eval_images, options.score_split == "validation"
    if data == image_data.EDGES_DATA:  # validation (a trial of `compare --tune`): other held-out digits
        held_out = image_data.held_out_edges(options.control, size, count, from_end=validation)
    else:  # the first training examples; validation: the last ones
        index = list(range(min(count, len(examples))))
        held_out = examples.take([len(examples) - 1 - i for i in index] if validation else index)
    return ControlRun(pipe, size, captions, examples, held_out)


def evaluate_samples(pipe: Any, options: RunOptions, size: int, held_out: image_data.ControlExamples,
                     control: bool) -> Scores:
    """(values, skipped, samples, per-sample values): how well samples for the held-out captions follow their
    controls."""
    from peftlab.diffusion import image_metrics as im

    controls = control_tensor(held_out.controls, size) if control else None
    samples = sample_images(pipe, held_out.captions, options, size, sample_seed(options), controls)
    grey = glyphs.to_array(samples, None)  # normalised once: the metrics take the array as it is
    result = im.control_fidelity(grey, glyphs.to_array(held_out.controls, None), options.control)
    if held_out.labels is not None:
        result.values["class_accuracy"] = im.class_accuracy(grey, held_out.labels)
    else:
        result.skipped["class_accuracy"] = "the data have no glyph labels (tiny-digits-edges has)"
    return result.values, result.skipped, samples, result.per_sample


def control_sampler(pipe: Any, examples: image_data.ControlExamples, controls: torch.Tensor, batch_size: int,
                    generator: torch.Generator) -> Any:
    """``sample()`` of the controllable objective: ``batch_size`` examples (weight 1/batch) with their ``controls``
    (the encoder's input, one per example), each caption replaced by "" with probability :data:`CAPTION_DROPOUT`,
    and fresh noise, all drawn from ``generator``."""
    latents = latents_of(pipe, image_data.pixels(examples.targets))
    ids = token_ids(pipe, examples.captions)
    empty = token_ids(pipe, [""])[0]
    return example_sampler(latents, ids, torch.ones(len(latents)), batch_size, generator,
                              pipe.scheduler.config.num_train_timesteps, controls, (empty, CAPTION_DROPOUT))


@owns_output_dir
def train(options: RunOptions, checkpoint: str | None = None) -> dict[str, Any]:
    """Train the condition encoder and ``options.method``'s adapters; returns the metrics (also ``metrics.json``)."""
    from accelerate.utils import set_seed

    set_seed(options.seed)
    keys = ("edge_f1", "edge_ssim", "segmentation_ssim", "landmark_error", "class_accuracy")
    return train_prepared(prepare(options), options, checkpoint, keys)


__all__ = ["CAPTION_DROPOUT", "CONTROLNET", "METRIC_BY_CONTROL", "ControlRun", "control_sampler", "evaluate",
           "evaluate_samples", "prepare", "train"]
