"""The embedded offline text-to-image model ``tiny-digits``: pretrained once on packaged images, then cached.

Design notes: ``docs/design.md``, section peftlab.diffusion.embedded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from peftlab.data import glyphs
from peftlab.errors import ConfigError
from peftlab.files import atomic_write_folder, atomic_write_json

EMBEDDED_MODEL = "tiny-digits"
MODEL_VERSION = 1  # bump when the recipe changes, so an old cached model is not reused
PRETRAIN_LETTERS = "ABCDEFGH"
REPORT_NAME = "peftlab_pretrain.json"
CLIP_VOCAB_SIZE = 49408


@dataclass(frozen=True)
class PretrainConfig:
    """How ``tiny-digits`` is pretrained. The defaults are the cached model; tests shrink the step counts."""

    seed: int = 0
    vae_steps: int = 300
    vae_learning_rate: float = 3e-3
    unet_steps: int = 1500
    learning_rate: float = 1.5e-3
    warmup_steps: int = 50
    batch_size: int = 32
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    letters: str = PRETRAIN_LETTERS
    per_letter: int = 100
    max_images: int | None = None  # keep only the first N images (a spread over classes), for tests

    def validate(self) -> PretrainConfig:
        for name in ("vae_steps", "unet_steps", "batch_size", "per_letter"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"PretrainConfig.{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.batch_size < 1:
            raise ConfigError(f"PretrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"PretrainConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"PretrainConfig.max_images must be >= 1 or None, got {self.max_images}")
        return self


def build_components(seed: int = 0) -> dict[str, Any]:
    """Fresh, randomly initialised (seeded) ``tiny-digits`` parts: vae, text_encoder, tokenizer, unet, scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from peftlab.diffusion.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=glyphs.IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    unet = UNet2DConditionModel(
        sample_size=glyphs.IMAGE_SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": clip_tokenizer(), "unet": unet,
            "scheduler": scheduler}


def training_images(config: PretrainConfig) -> glyphs.GlyphSet:
    """The pretraining images: all digits, then ``per_letter`` renderings of each of ``config.letters``."""
    data = glyphs.digit_images()
    if config.letters:
        data = glyphs.concat(data, glyphs.letter_images(config.letters, config.per_letter, seed=config.seed))
    if config.max_images is not None:
        data = data.subset(np.unique(np.linspace(0, len(data) - 1, config.max_images).round().astype(int)))
    return data


def _pixels(images: np.ndarray) -> torch.Tensor:
    """(N, h, w) grey in [0, 1] → (N, 3, h, w) in [−1, 1], the pipeline's image convention."""
    return torch.from_numpy(images)[:, None].repeat(1, 3, 1, 1) * 2 - 1


def _optimizer_step(optimizer: Any, schedule: Any, loss: torch.Tensor, where: tuple[str, int],
                    progress: Callable[[str, int, float], None] | None) -> float:
    """After ``backward``: the optimiser (and ``schedule``) step, gradients cleared; ``loss`` reported to ``progress``
    as (stage, step, value) and returned."""
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    if progress:
        progress(*where, value)
    return value


def train_vae(vae, images: np.ndarray, config: PretrainConfig, generator: torch.Generator,
              progress: Callable[[str, int, float], None] | None = None) -> float:
    """Fit the autoencoder on reconstruction + 10⁻⁶·KL, set ``scaling_factor`` = 1 / latent std; return the last MSE."""
    x = _pixels(images)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    mse = float("nan")
    vae.train()
    for step in range(config.vae_steps):
        batch = x[torch.randint(0, len(x), (config.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch)
        (loss + 1e-6 * posterior.kl().mean()).backward()
        mse = _optimizer_step(optimizer, None, loss, ("vae", step), progress)
    vae.eval()
    latents = encode_latents(vae, images, scale=False)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std().clamp_min(1e-6)))
    return mse


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, scale: bool = True, batch_size: int = 256) -> torch.Tensor:
    """Posterior means E(x) (times ``vae.config.scaling_factor`` when ``scale``) of (N, h, w) grey images."""
    x = _pixels(images)
    means = [vae.encode(x[i : i + batch_size]).latent_dist.mean for i in range(0, len(x), batch_size)]
    z = torch.cat(means) if means else torch.zeros(0, vae.config.latent_channels, 1, 1)
    return z * vae.config.scaling_factor if scale else z


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """w(t) = min(SNR(t), γ) / SNR(t) with SNR(t) = ᾱ_t / (1 − ᾱ_t): min-SNR-γ for ε-prediction."""
    abar = alphas_cumprod[timesteps]
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / snr


def train_denoiser(components: dict[str, Any], latents: torch.Tensor, captions: list[str], config: PretrainConfig,
                   generator: torch.Generator, progress: Callable[[str, int, float], None] | None = None) -> float:
    """Train UNet + text encoder jointly on ε-prediction (docs/design.md). Returns the last loss."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    unet, text_encoder, tokenizer = components["unet"], components["text_encoder"], components["tokenizer"]
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    prompts = sorted(set(captions)) + [""]
    prompt_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
    caption_index = torch.tensor([prompts.index(c) for c in captions])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, config.unet_steps),
                                               max(config.unet_steps, 1))
    unet.train()
    text_encoder.train()
    loss_value = float("nan")
    for step in range(config.unet_steps):
        index = torch.randint(0, len(latents), (config.batch_size,), generator=generator)
        z0 = latents[index]
        ids = caption_index[index]
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        ids = torch.where(dropped, torch.full_like(ids, len(prompts) - 1), ids)
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(z0, noise, t)
        prediction = unet(noisy, t, text_encoder(prompt_ids[ids]).last_hidden_state).sample
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (min_snr_weights(alphas_cumprod, t, config.snr_gamma) * per_sample).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        loss_value = _optimizer_step(optimizer, schedule, loss, ("unet", step), progress)
    unet.eval()
    text_encoder.eval()
    return loss_value


def parameter_counts(components: dict[str, Any]) -> dict[str, int]:
    """Number of parameters of each trainable component."""
    return {k: sum(p.numel() for p in components[k].parameters()) for k in ("vae", "text_encoder", "unet")}


def pretrain(out_dir: str | os.PathLike, config: PretrainConfig | None = None,
             progress: Callable[[str, int, float], None] | None = None) -> dict[str, Any]:
    """Pretrain ``tiny-digits`` and save it as a diffusers pipeline folder at ``out_dir`` (a new or empty folder).

    Writes into ``out_dir`` directly: :func:`ensure_pretrained` gives it a temporary folder and renames it.
    Returns the report also saved as ``peftlab_pretrain.json`` (config, seconds per stage, losses, parameters).
    """
    from diffusers import StableDiffusionPipeline


    config = (config or PretrainConfig()).validate()
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    data = training_images(config)
    components = build_components(config.seed)
    vae_mse = train_vae(components["vae"], data.images, config, generator, progress)
    vae_seconds = time.perf_counter() - start
    latents = encode_latents(components["vae"], data.images)
    loss = train_denoiser(components, latents, data.captions(), config, generator, progress)
    pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    report = {
        "model": EMBEDDED_MODEL, "version": MODEL_VERSION, "config": asdict(config), "images": len(data),
        "prompts": sorted(set(data.captions())), "parameters": parameter_counts(components),
        "vae_mse": vae_mse, "final_loss": loss, "scaling_factor": components["vae"].config.scaling_factor,
        "seconds": {"vae": round(vae_seconds, 1), "total": round(time.perf_counter() - start, 1)},
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(Path(out_dir) / REPORT_NAME, report)
    return report


def model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the cached ``tiny-digits`` pipeline lives: ``<cache>/models/tiny-digits-v<version>``."""
    from peftlab.data.cache import cache_dir as default_cache

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache()
    return root / "models" / f"{EMBEDDED_MODEL}-v{MODEL_VERSION}"


def _print_progress(every: int = 100) -> Callable[[str, int, float], None]:
    def report(stage: str, step: int, loss: float) -> None:
        if step % every == 0:
            print(f"[peftlab] pretraining {EMBEDDED_MODEL}: {stage} step {step}, loss {loss:.4f}", flush=True)

    return report


def ensure_pretrained(cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                      config: PretrainConfig | None = None) -> Path:
    """The folder of the cached ``tiny-digits`` pipeline, pretraining it first if it is missing (or ``force``).

    A file lock next to the folder makes a second process wait for the first instead of pretraining twice;
    the model is written into a temporary folder beside the target and renamed into place, so an interrupted
    run leaves nothing that a later call would trust. Pretraining takes about 10 minutes of CPU time.
    A non-default ``config`` is only meant for experiments: it is written to the same cache folder.
    """
    from filelock import FileLock

    target = model_dir(cache_dir)
    if target.is_dir() and (target / "model_index.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir() and (target / "model_index.json").is_file() and not force:
            return target  # another process finished it while we waited
        print(f"[peftlab] pretraining the embedded model {EMBEDDED_MODEL} once (about 10 CPU-minutes); "
              f"it is cached in {target}", flush=True)
        atomic_write_folder(target, lambda tmp: pretrain(tmp, config, progress=_print_progress()))
    return target


def load_pipeline(path: str | os.PathLike | None = None):
    """``StableDiffusionPipeline.from_pretrained`` of ``path`` (default: the cached ``tiny-digits``, pretrained if
    missing), with the progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(path or ensure_pretrained()))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


__all__ = ["EMBEDDED_MODEL", "PretrainConfig", "build_components", "encode_latents", "ensure_pretrained",
           "load_pipeline", "min_snr_weights", "model_dir", "pretrain", "training_images"]
