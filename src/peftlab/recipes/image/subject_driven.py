"""Subject-driven generation (DreamBooth, Ruiz et al. 2023) with a method's adapters on a diffusers pipeline.

    peftlab train --task subject-driven --model tiny-digits --instance-data glyph:K \\
        --instance-prompt "a handwritten sks glyph" --class-prompt "a handwritten letter" --method hra

Objective, with x the instance images (prompt c = ``--instance-prompt``) and x_pr the class images (prompt
c_pr = ``--class-prompt``) that the *frozen base* pipeline generated from c_pr once (cached, see
:mod:`.image_data`):

    L = E‖ε − ε_θ(x_t, t, τ(c))‖² + λ · E‖ε' − ε_θ(x_pr,t', t', τ(c_pr))‖²,   λ = ``--prior-loss-weight``

(DreamBooth's prior-preservation loss; each batch holds ``--batch-size`` instance and ``--batch-size`` class
examples). The method adapts the UNet (and, with ``--train-text-encoder``, the CLIP text encoder); nothing
else trains. The run folder is a pipeline adapter folder (``pipeline.json``, ``unet/`` [+ ``text_encoder/``])
plus ``run_config.json``, ``samples.png``, ``training_curve.png`` and ``metrics.json``, so ``peftlab
generate / merge / export / inspect`` take it.

Metrics, sampled with the same seed before (the base) and after training:

* ``subject_similarity`` (stand-in for DINO / CLIP-I) of ``--num-eval-images`` samples of the instance prompt
  to the instance images, and ``prior_class_accuracy``: the glyph classifier's accuracy on "a handwritten
  digit k" samples (k = 0…9), whose drop is forgetting of the prior (:mod:`peftlab.diffusion.image_metrics`);
* with ``--eval-encoder``: ``clip_i``, ``clip_t`` (CLIP) and ``dino``; otherwise they are listed under
  ``skipped`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftlab.data import glyphs
from peftlab.recipes.image import data as image_data
from peftlab.recipes.image.run import Objective, PreparedRun, Scores, evaluate, train_prepared
from peftlab.recipes.image.training import (
    Batch,
    check_prompts,
    draw_noise,
    encoder_names,
    latents_of,
    load_base,
    resolution,
    sample_images,
    token_ids,
)
from peftlab.recipes.options import RunOptions, sample_seed
from peftlab.recipes.rundir import owns_output_dir
from peftlab.recipes.training import log

PRIOR_PROMPTS = tuple(glyphs.caption(k) for k in range(10))
METRIC = "subject_similarity"


@dataclass
class SubjectRun(PreparedRun):
    """A prepared subject-driven run: the instance images and the class images (cached) besides the pipeline."""

    instances: list[Any]
    classes: list[Any]
    class_images_reused: bool

    def metrics(self, options: RunOptions) -> dict[str, Any]:
        return {"metric": METRIC, "instance_data": options.instance_data, "num_instance_images": len(self.instances),
                "num_class_images": len(self.classes), "class_images_reused": self.class_images_reused}

    def score(self, options: RunOptions, trained: bool) -> Scores:
        return evaluate_samples(self.pipe, options, self.size, self.instances)

    def sample_prompts(self, options: RunOptions) -> list[str]:
        return [options.instance_prompt] * options.num_eval_images

    def objective(self, options: RunOptions, generator: torch.Generator) -> tuple[Objective, str]:
        data = training_data(self.pipe, options, self.instances, self.classes)
        sample = sampler(data, options, generator, self.pipe.scheduler.config.num_train_timesteps)
        return Objective(sample), f"{len(self.instances)} instance image(s) of {options.instance_data}"


def prepare(options: RunOptions) -> SubjectRun:
    """Everything checked and loaded before the run folder is touched: the base pipeline, the instance images,
    the prompts, the class images (cached)."""
    pipe = load_base(options)
    size = resolution(pipe, options)
    check_prompts(pipe, {"--instance-prompt": options.instance_prompt, "--class-prompt": options.class_prompt})
    instances = image_data.instance_images(options.instance_data, size)
    classes, reused = [], True
    if options.prior_loss_weight > 0:
        from accelerate import PartialState

        from peftlab.diffusion.pipeline import resolve_pipeline

        identity = image_data.model_identity(options.model, resolve_pipeline(options.model))
        # under accelerate launch the main process generates them, the others then read its cache (the state's
        # cpu flag as image_training.fit's Accelerator has it: without it, CPU processes do not see each other)
        with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
            classes, reused = image_data.class_images(pipe, identity, options.class_prompt, options.num_class_images,
                                                      options.seed, size, options.inference_steps,
                                                      options.guidance_scale)
        log(f"class images: {len(classes)} for {options.class_prompt!r} "
            f"({'reused from the cache' if reused else 'generated by the base model and cached'})")
    return SubjectRun(pipe, size, [options.instance_prompt, options.class_prompt], instances, classes, reused)


def training_data(pipe: Any, options: RunOptions, instances: list[Any], classes: list[Any]) -> dict[str, torch.Tensor]:
    """Latents, token ids and loss weights of the instance examples and of the class examples."""
    inst = latents_of(pipe, image_data.pixels(instances))
    data = {"instance_latents": inst, "instance_ids": token_ids(pipe, [options.instance_prompt] * len(inst))}
    if classes:
        cls = latents_of(pipe, image_data.pixels(classes))
        data.update(class_latents=cls, class_ids=token_ids(pipe, [options.class_prompt] * len(cls)))
    return data


def sampler(data: dict[str, torch.Tensor], options: RunOptions, generator: torch.Generator, timesteps: int):
    """``sample()``: ``batch_size`` instance examples (weight 1/n) and, with a prior, ``batch_size`` class
    examples (weight λ/n), with fresh noise."""
    n = options.batch_size

    def pick(latents: torch.Tensor, ids: torch.Tensor, weight: float) -> Batch:
        index = torch.randint(0, len(latents), (n,), generator=generator)
        return Batch(latents[index], ids[index], torch.full((n,), weight / n))

    def sample() -> Batch:
        parts = [pick(data["instance_latents"], data["instance_ids"], 1.0)]
        if "class_latents" in data:
            parts.append(pick(data["class_latents"], data["class_ids"], options.prior_loss_weight))
        batch = Batch(*(torch.cat([getattr(p, k) for p in parts]) for k in ("latents", "ids", "weights")))
        return draw_noise(batch, timesteps, generator)

    return sample


def evaluate_samples(pipe: Any, options: RunOptions, size: int, instances: list[Any]) -> Scores:
    """(values, skipped, subject samples, per-sample values): the subject and prior metrics of the pipeline as it
    is now."""
    from peftlab.diffusion import image_metrics as im

    seed = sample_seed(options)  # other noise for a validation score (a trial of `compare --tune`)
    subject = sample_images(pipe, [options.instance_prompt] * options.num_eval_images, options, size, seed)
    prior = sample_images(pipe, list(PRIOR_PROMPTS) * 2, options, size, seed + 1)
    result = im.ImageMetrics()
    result.add_mean("subject_similarity", im.subject_similarity_per_sample(glyphs.to_array(subject),
                                                                           glyphs.to_array(instances)))
    result.values["prior_class_accuracy"] = im.class_accuracy(glyphs.to_array(prior),
                                                              [k % 10 for k in range(len(prior))])
    clip, dino = encoder_names(options.eval_encoder)
    result.update(im.clip_scores(subject, options.instance_prompt, instances, clip))
    result.update(im.dino_similarity(subject, instances, dino))
    return result.values, result.skipped, subject, result.per_sample


@owns_output_dir
def train(options: RunOptions, checkpoint: str | None = None) -> dict[str, Any]:
    """Train ``options.method`` on the subject; returns the metrics (also in ``metrics.json``)."""
    from accelerate.utils import set_seed

    set_seed(options.seed)
    return train_prepared(prepare(options), options, checkpoint, ("subject_similarity", "prior_class_accuracy"))


__all__ = ["METRIC", "PRIOR_PROMPTS", "SubjectRun", "evaluate", "evaluate_samples", "prepare", "sampler", "train",
           "training_data"]
