"""What the image recipes share: the pipeline and its adapters, latents and prompts, the denoising loss, the
training loop (HF ``accelerate``), sampling for the metrics, and the run folder's final files.

Design notes: ``docs/design.md``, section peftlab.recipes.image.training.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftlab import files
from peftlab.errors import PeftlabError, RecipeError
from peftlab.recipes.image.checkpoints import CHECKPOINT_WEIGHTS, load_checkpoint, register_checkpoint_hooks
from peftlab.recipes.options import RunOptions
from peftlab.recipes.rundir import (
    CURVE_FILE,
    METRICS_FILE,
    TRAINER_STATE,
    checkpoint_folders,
    is_main_process,
    remove_checkpoints,
    write_metrics,
)
from peftlab.recipes.training import LOGS_DIR, PeakMemory, log, plot_training_curve

SAMPLES_FILE = "samples.png"


# -- the pipeline ------------------------------------------------------------------------------------------------
def load_base(options: RunOptions) -> Any:
    """The frozen base pipeline of ``--model`` (every weight ``requires_grad=False``, in ``--torch-dtype``),
    progress bars off, on the GPU when there is one (accelerate's device: GPU ``$LOCAL_RANK`` under
    ``accelerate launch``)."""
    from peftlab.diffusion.pipeline import load_pipeline
    from peftlab.recipes.scale import pipeline_dtype

    pipe = load_pipeline(options.model, dtype=pipeline_dtype(options))
    pipe.to(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    for name in ("unet", "text_encoder", "vae"):
        pipe.components[name].requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolution(pipe: Any, options: RunOptions) -> int:
    """``--resolution``, else the UNet's sample size × the VAE's scale factor; a multiple of that factor."""
    size = options.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if size % pipe.vae_scale_factor or size % 8:
        raise RecipeError(f"--resolution {size} must be a multiple of 8 and of the VAE's factor "
                          f"{pipe.vae_scale_factor}")
    return size


def check_prompts(pipe: Any, prompts: dict[str, str]) -> None:
    """One-line errors for an empty prompt or one longer than the text encoder takes (77 tokens for CLIP)."""
    from peftlab.diffusion.tokenizer import check_prompt

    for flag, text in prompts.items():
        check_prompt(pipe.tokenizer, text, flag)


def add_adapters(pipe: Any, options: RunOptions, text_encoder: bool, texts: list[str]) -> dict[str, Any]:
    """The method's adapters on the UNet (and the text encoder), default targets unless ``--target-modules``."""
    from peftlab.diffusion.pipeline import add_pipeline_adapters
    from peftlab.recipes.adapters import adapter_options

    cls, fields = adapter_options(options.method, options.adapter_args)
    targets = options.target_modules if options.target_modules not in (None, "all-linear") else None
    try:
        config = cls(r=options.r, target_modules=targets, **fields).resolve(lambda: texts, seed=options.seed)
        names = ("unet", "text_encoder") if text_encoder else ("unet",)
        return add_pipeline_adapters(pipe, {name: config for name in names})
    except (PeftlabError, TypeError) as err:
        raise RecipeError(f"{options.method}: {err}") from None


@torch.no_grad()
def latents_of(pipe: Any, images: Tensor, batch_size: int = 32) -> Tensor:
    """z₀ = s·E(x): the VAE posterior means of pixel batches (N, 3, H, W) in [−1, 1], times ``scaling_factor``."""
    vae = pipe.vae
    means = [vae.encode(images[i:i + batch_size].to(vae.device, vae.dtype)).latent_dist.mean
             for i in range(0, len(images), batch_size)]
    return torch.cat(means).float() * vae.config.scaling_factor


def token_ids(pipe: Any, prompts: list[str]) -> Tensor:
    """Padded CLIP token ids (N, 77) of the prompts."""
    tokenizer = pipe.tokenizer
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def noise_scheduler(pipe: Any) -> Any:
    """The DDPM forward process of the pipeline's own schedule (ᾱ_t), for training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


# -- the loss ----------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One training batch: latents z₀ (B, 4, h, w), token ids (B, 77), loss weights w (B,), control images
    (B, 3, H, W) or ``None``, and the noise ε and timesteps t (drawn by :func:`draw_noise` when ``None``)."""

    latents: Tensor
    ids: Tensor
    weights: Tensor
    control: Tensor | None = None
    noise: Tensor | None = None
    timesteps: Tensor | None = None


def draw_noise(batch: Batch, num_train_timesteps: int, generator: torch.Generator) -> Batch:
    """The batch with ε ~ N(0, I) and t ~ U{0, …, T−1} drawn from ``generator``."""
    noise = torch.randn(batch.latents.shape, generator=generator)
    t = torch.randint(0, num_train_timesteps, (len(batch.latents),), generator=generator)
    return replace(batch, noise=noise, timesteps=t)


def denoising_target(scheduler: Any, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the UNet learns to predict, by its scheduler's ``prediction_type`` (as diffusers' training examples):
    ε (``epsilon``, Stable Diffusion 1.x), v = √ᾱ_t·ε − √(1−ᾱ_t)·z₀ (``v_prediction``, Stable Diffusion 2.x;
    Salimans & Ho 2022) or z₀ (``sample``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    if kind == "sample":
        return z0
    raise RecipeError(f"the pipeline's scheduler has prediction_type={kind!r}; peftlab trains epsilon, v_prediction "
                      "and sample models")


def denoising_loss(pipe: Any, scheduler: Any, batch: Batch, hook: Any = None) -> Tensor:
    """L = Σ_i w_i·mean‖y_i − f_θ(x_t, t, τ(c_i))‖², y the target of :func:`denoising_target` (ε for the usual
    ε-prediction model; docs/design.md); ``hook``: the condition encoder's."""
    device = pipe.unet.device
    z0, noise, t = batch.latents.to(device), batch.noise.to(device), batch.timesteps.to(device)
    noisy = scheduler.add_noise(z0, noise, t).to(pipe.unet.dtype)  # the UNet's dtype (--torch-dtype)
    text_grad = torch.is_grad_enabled() and any(p.requires_grad for p in pipe.text_encoder.parameters())
    with torch.set_grad_enabled(text_grad):
        states = pipe.text_encoder(batch.ids.to(device)).last_hidden_state  # no graph when it is frozen
    if hook is not None:
        hook.control = batch.control
    prediction = unet_prediction(pipe, noisy, t, states.to(noisy.dtype), batch.control)
    target = denoising_target(scheduler, z0, noise, t)
    per_example = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    return (batch.weights.to(device) * per_example).sum()


def unet_prediction(pipe: Any, noisy: Tensor, t: Tensor, states: Tensor, control: Tensor | None) -> Tensor:
    """f_θ(x_t, t, τ): the UNet's output; with a ``controlnet`` component (``--control-encoder controlnet``) the
    ControlNet's residuals of ``control`` are added to the UNet's skip connections and mid block, as diffusers'
    ``StableDiffusionControlNetPipeline`` and its ControlNet training example do."""
    extra: dict[str, Any] = {}
    controlnet = pipe.components.get("controlnet")
    if controlnet is not None:
        if control is None:
            raise RecipeError("this pipeline has a ControlNet: every training batch needs its control images")
        down, mid = controlnet(noisy, t, encoder_hidden_states=states, controlnet_cond=control.to(noisy),
                               return_dict=False)
        extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    return pipe.unet(noisy, t, encoder_hidden_states=states, return_dict=False, **extra)[0]


# -- the loop ----------------------------------------------------------------------------------------------------
def named_trainable(modules: list[nn.Module]) -> dict[str, nn.Parameter]:
    """The parameters that train (``requires_grad``), each once, by ``<index of its module>.<parameter name>``."""
    named: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                named[f"{i}.{name}"] = p
    return named


def trainable(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters that train (``requires_grad``), each once."""
    return list(named_trainable(modules).values())


class Denoiser(nn.Module):
    """The modules that train as one module whose forward is :func:`denoising_loss`: what ``accelerator.prepare``
    wraps (in ``DistributedDataParallel`` when there are several processes, which then averages the gradients of
    the UNet's adapters, the text encoder's and the condition encoder over the processes)."""

    def __init__(self, pipe: Any, modules: list[nn.Module], hook: Any = None) -> None:
        super().__init__()
        self.trained = nn.ModuleList(modules)
        self.pipe, self.noise_scheduler, self.hook = pipe, noise_scheduler(pipe), hook

    def forward(self, batch: Batch) -> Tensor:
        return denoising_loss(self.pipe, self.noise_scheduler, batch, self.hook)


def save_checkpoint(out: Path, step: int, accelerator: Any, losses: list[float], runtime: float) -> Path:
    """Write ``out/checkpoint-<step>`` with ``accelerator.save_state`` on every process (see the module docstring),
    then, on the main process, ``trainer_state.json`` (last) and delete the older checkpoints."""
    folder = out / f"checkpoint-{step}"
    if accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files.atomic_write_json(folder / TRAINER_STATE, {"global_step": step, "losses": losses,
                                                         "train_runtime_s": runtime,
                                                         "num_processes": accelerator.num_processes})
        for older in checkpoint_folders(out):
            if older != folder:
                shutil.rmtree(older, ignore_errors=True)
    return folder


def fit(pipe: Any, modules: list[nn.Module], sample: Callable[[], Batch], options: RunOptions,
        hook: Any = None, progress: bool = True, out: Path | None = None, checkpoint: str | None = None,
        generator: torch.Generator | None = None) -> dict[str, Any]:
    """Train the trainable parameters of ``modules`` for ``options.max_steps`` optimizer steps with HF
    ``accelerate``, on each process of an ``accelerate launch``: ``sample()`` gives each process its micro-batches
    (its random draws come from ``generator``, reseeded with its seed + the process index when there are several)
    and accelerate averages the gradients. With ``out``, checkpoints go to ``out/checkpoint-<step>``; ``checkpoint``
    is one to continue from. Returns the losses (means over the processes) and timings."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import get_scheduler

    from peftlab.recipes.scale import accelerator_kwargs

    named = named_trainable(modules)
    params = list(named.values())
    if not params:
        raise RecipeError("nothing to train: the adapters have no trainable parameters")
    tracker = options.report_to not in (None, "none") and out is not None
    AcceleratorState._reset_state()  # this run's own mixed precision, not an earlier run's (as HF Trainer resets)
    accelerator = Accelerator(**accelerator_kwargs(options), log_with=options.report_to if tracker else None,
                              project_dir=str(out / LOGS_DIR) if tracker else None)
    main, processes = accelerator.is_main_process, accelerator.num_processes
    if tracker:  # the options as hyperparameters (flat: trackers take numbers, strings and booleans)
        accelerator.init_trackers(out.name, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                    for k, v in options.to_dict().items()})
    if generator is not None and processes > 1:  # each process draws other examples
        generator.manual_seed(generator.initial_seed() + accelerator.process_index)
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    steps = options.max_steps
    warmup = int(options.warmup if options.warmup >= 1 else math.ceil(options.warmup * steps))
    # accelerate steps the schedule once per process at each optimizer step (so do diffusers' training examples)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=warmup * processes,
                             num_training_steps=steps * processes)
    denoiser, optimizer, schedule = accelerator.prepare(Denoiser(pipe, modules, hook), optimizer, schedule)
    register_checkpoint_hooks(accelerator, pipe, named, generator)
    losses: list[float] = []
    done, earlier_runtime = 0, 0.0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, accelerator)
        done, losses, earlier_runtime = state["global_step"], list(state["losses"]), state.get("train_runtime_s", 0.0)
        log(f"resuming from {checkpoint} (step {done} of {steps})", main)
    denoiser.train()
    start = time.perf_counter()
    with PeakMemory() as memory:
        for step in range(done, steps):
            total = 0.0
            for _ in range(options.gradient_accumulation_steps):
                with accelerator.accumulate(denoiser):
                    with accelerator.autocast():
                        loss = denoiser(sample())
                    mean = accelerator.reduce(loss.detach(), "mean")  # over the processes
                    if not torch.isfinite(mean):
                        raise RecipeError(f"the loss is {mean.item()} at step {step}; lower --lr")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                total += mean.item() / options.gradient_accumulation_steps
            losses.append(total)
            if tracker:
                accelerator.log({"train/loss": total, "train/learning_rate": schedule.get_last_lr()[0]}, step=step + 1)
            if progress and (step % 50 == 0 or step == steps - 1):
                log(f"step {step + 1}/{steps}: loss {total:.4f}, lr {schedule.get_last_lr()[0]:.2e}", main)
            if out is not None and ((step + 1) % options.eval_steps == 0 or step == steps - 1):
                save_checkpoint(out, step + 1, accelerator, losses, earlier_runtime + time.perf_counter() - start)
    runtime = earlier_runtime + time.perf_counter() - start
    if tracker:
        accelerator.end_training()
    for module in modules:
        module.eval()
    accelerator.free_memory()
    return {"global_step": steps, "train_loss": sum(losses) / len(losses), "final_loss": losses[-1],
            "losses": losses, "train_runtime_s": round(runtime, 2), "seconds_per_step": runtime / steps,
            "peak_memory_mb": round(memory.peak_mb, 1), "peak_memory_kind": memory.kind,
            "trainable_params": sum(p.numel() for p in params), "total_params": total_params(pipe, modules)}


def total_params(pipe: Any, modules: list[nn.Module]) -> int:
    """Parameters of the pipeline's models (UNet, VAE, text encoder) and of ``modules`` (a condition encoder),
    each counted once."""
    parts = [c for c in pipe.components.values() if isinstance(c, nn.Module)] + list(modules)
    return sum(p.numel() for p in {id(p): p for m in parts for p in m.parameters()}.values())


def example_sampler(latents: Tensor, ids: Tensor, weights: Tensor, batch_size: int, generator: torch.Generator,
                    num_train_timesteps: int, control: Tensor | None = None,
                    caption_dropout: tuple[Tensor, float] | None = None) -> Callable[[], Batch]:
    """``sample()``: ``batch_size`` random examples (with replacement) and fresh noise, from ``generator``;
    ``caption_dropout`` = (ids of "", p): each caption is replaced by "" with probability p."""

    def sample() -> Batch:
        index = torch.randint(0, len(latents), (batch_size,), generator=generator)
        chosen = ids[index]
        if caption_dropout is not None:
            empty, p = caption_dropout
            chosen = torch.where((torch.rand(batch_size, generator=generator) < p)[:, None], empty, chosen)
        batch = Batch(latents[index], chosen, weights[index] / batch_size,
                      None if control is None else control[index])
        return draw_noise(batch, num_train_timesteps, generator)

    return sample


# -- sampling and the end of a run -------------------------------------------------------------------------------
def sample_images(pipe: Any, prompts: list[str], options: RunOptions, size: int, seed: int,
                  control: Tensor | None = None) -> list[Any]:
    """One image per prompt (RGB PIL), seeded; ``control`` (one per prompt, in [0, 1]) goes to the condition
    encoder, or to the ControlNet pipeline as its ``image``."""
    import contextlib

    from peftlab.diffusion.conditioning import controlled
    from peftlab.recipes.scale import sampling_kwargs

    generator = torch.Generator("cpu").manual_seed(seed)
    images: list[Any] = []
    chunk = 16
    for i in range(0, len(prompts), chunk):
        image = {} if control is None or "controlnet" not in pipe.components else {"image": control[i:i + chunk]}
        hooked = control is not None and not image
        block = controlled(pipe, control[i:i + chunk]) if hooked else contextlib.nullcontext()
        with torch.inference_mode(), block:
            images += pipe(prompts[i:i + chunk], **sampling_kwargs(options), height=size, width=size,
                           generator=generator, output_type="pil", **image).images
    return images


def finish_image_run(pipe: Any, out: Path, metrics: dict[str, Any], samples: list[Any], losses: list[float],
                     keep_checkpoints: bool = True) -> None:
    """Write the adapters (``save_pipeline_adapters``), a grid of samples, the loss curve and, last,
    ``metrics.json``: a folder with ``metrics.json`` is a finished run. Without ``keep_checkpoints`` the
    checkpoint is removed after. Only the main process writes; the others return at once."""
    from peftlab.diffusion.pipeline import save_pipeline_adapters

    if not is_main_process():
        return
    save_pipeline_adapters(pipe, out)
    if samples:
        files.atomic_write_image_grid(out / SAMPLES_FILE, samples)
    plot_training_curve([{"step": i + 1, "loss": v} for i, v in enumerate(losses)], out / CURVE_FILE, "loss")
    write_metrics(out, metrics)
    if not keep_checkpoints:
        remove_checkpoints(out)


def saved_metrics(folder: Any) -> dict[str, Any]:
    """``peftlab eval`` of an image run: the metrics its training wrote (its samples are seeded, so sampling
    again would give the same numbers on the same machine)."""
    metrics = files.read_json(Path(folder) / METRICS_FILE)
    split = "test" if "test" in metrics else "validation"  # validation: a trial of `compare --tune`
    return {**metrics, "split": split, "data": metrics.get("data") or metrics.get("instance_data")}


def encoder_names(spec: str | None) -> tuple[str | None, str | None]:
    """(CLIP, DINO) encoders of ``--eval-encoder``: ``NAME`` (CLIP), or ``clip=NAME,dino=NAME``."""
    clip = dino = None
    for item in filter(None, (spec or "").split(",")):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "dino":
            dino = value.strip()
        elif sep and key.strip() == "clip":
            clip = value.strip()
        elif sep:
            raise RecipeError(f"--eval-encoder: unknown key {key!r}; use NAME, clip=NAME or dino=NAME")
        else:
            clip = item.strip()
    return clip, dino


def summary(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    """One line: each metric before → after (when both exist)."""
    parts = []
    for key in keys:
        after, before = metrics.get("test", metrics.get("validation", {})).get(key), metrics["before"].get(key)
        if after is None:
            continue
        parts.append(f"{key} {before:.3f} -> {after:.3f}" if before is not None else f"{key} {after:.3f}")
    return ", ".join(parts)


__all__ = ["CHECKPOINT_WEIGHTS", "Batch", "Denoiser", "add_adapters", "denoising_loss", "draw_noise", "example_sampler",
           "finish_image_run", "fit", "latents_of", "load_base", "resolution", "sample_images", "token_ids",
           "trainable"]
