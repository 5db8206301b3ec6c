"""A trained :class:`~peftlab.diffusion.control.ConditionEncoder` on a pipeline's UNet: attach, set the control,
save and load.

The encoder E_φ is applied by a forward hook on ``unet.conv_in``: the UNet's first feature map becomes

    h₀ = conv_in(z_t) + E_φ(c)

(the controllable-generation setting of OFT / HRA). The pipeline itself is unchanged (a plain
``StableDiffusionPipeline``); the control image c is set for the next calls with :func:`controlled`. When the
UNet's batch is a multiple m of the controls' (classifier-free guidance doubles it, ``num_images_per_prompt``
repeats the prompt), the features are tiled m times, which is how diffusers batches a latent: [uncond; cond].

On disk (next to the adapters, see :mod:`peftlab.diffusion.pipeline`)::

    folder/condition_encoder/config.json               {"out_channels", "downscale", "in_channels", "hidden_channels"}
    folder/condition_encoder/model.safetensors         the encoder's weights
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from peftlab import files
from peftlab.diffusion.control import ConditionEncoder
from peftlab.errors import AdapterLoadError, ConfigError

CONDITION_COMPONENT = "condition_encoder"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ATTRIBUTE = "peftlab_condition"
HINT_WIDTHS = (16, 32, 96, 256, 256, 256)  # ControlNet's hint encoder widths (diffusers' default: the first four)


class ControlHook:
    """The forward hook on ``conv_in``: adds E_φ(c) to its output; ``control`` is c, (B, 3, H, W) in [0, 1]."""

    def __init__(self, encoder: ConditionEncoder) -> None:
        self.encoder = encoder
        self.control: Tensor | None = None
        self.handle: Any = None

    def __call__(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if self.control is None:
            raise ConfigError("this pipeline has a condition encoder: set a control image first "
                              "(peftlab.diffusion.conditioning.controlled, or --control IMG)")
        param = next(self.encoder.parameters())
        features = self.encoder(self.control.to(device=param.device, dtype=param.dtype)).to(output.dtype)
        repeats, rest = divmod(output.shape[0], features.shape[0])
        if rest:
            raise ConfigError(f"the UNet batch ({output.shape[0]}) is not a multiple of the number of control "
                              f"images ({features.shape[0]}); give one control image, or one per image")
        return output + features.repeat(repeats, 1, 1, 1)


def condition_hook(pipe: Any) -> ControlHook | None:
    """The pipeline's control hook (``None`` when it has no condition encoder)."""
    return pipe.__dict__.get(ATTRIBUTE)


def attach_condition_encoder(pipe: Any, encoder: ConditionEncoder) -> ControlHook:
    """Hook ``encoder`` onto ``pipe.unet.conv_in`` (replacing an earlier one); returns the hook."""
    detach_condition_encoder(pipe)
    encoder.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    hook = ControlHook(encoder)
    hook.handle = pipe.unet.conv_in.register_forward_hook(hook)
    pipe.__dict__[ATTRIBUTE] = hook
    return hook


def detach_condition_encoder(pipe: Any) -> None:
    """Remove the pipeline's condition encoder hook, if any."""
    hook = pipe.__dict__.pop(ATTRIBUTE, None)
    if hook is not None:
        hook.handle.remove()


@contextlib.contextmanager
def controlled(pipe: Any, control: Tensor) -> Iterator[Any]:
    """Inside the block every UNet call of ``pipe`` adds E_φ(``control``) (see :class:`ControlHook`)."""
    hook = condition_hook(pipe)
    if hook is None:
        raise ConfigError("the pipeline has no condition encoder; attach one with attach_condition_encoder")
    previous, hook.control = hook.control, control
    try:
        yield pipe
    finally:
        hook.control = previous


def new_condition_encoder(pipe: Any) -> ConditionEncoder:
    """A zero-output encoder that fits ``pipe``: C = the UNet's first width, f = the VAE's downscale."""
    return ConditionEncoder.for_unet(pipe.unet, pipe.vae_scale_factor)


def new_controlnet(pipe: Any) -> nn.Module:
    """A ControlNet for ``pipe``'s UNet (diffusers ``ControlNetModel.from_unet``; Zhang et al. 2023): a trainable
    copy of the UNet's conv_in, time embedding, down blocks and mid block, whose outputs reach the UNet through
    zero-initialised 1×1 convolutions Z_i as ``down_block_additional_residuals`` (one per skip connection) and
    ``mid_block_additional_residual``:

        skip_i ← skip_i + Z_i(F_i(conv_in′(z_t) + H(c), t, τ)),    mid ← mid + Z_mid(F_mid(…))

    (F, conv_in′: the copies) where H is ControlNet's hint encoder with the VAE's downscale f (log₂ f + 1 widths of
    :data:`HINT_WIDTHS`; its last convolution is zero too). Because every Z_i = 0 at initialisation, the UNet's
    output is exactly the base's until training moves them. It lives on the UNet's device and dtype and trains
    (``requires_grad``)."""
    import math

    from diffusers import ControlNetModel

    halvings = int(math.log2(pipe.vae_scale_factor))
    controlnet = ControlNetModel.from_unet(pipe.unet,
                                           conditioning_embedding_out_channels=HINT_WIDTHS[: halvings + 1])
    controlnet.to(pipe.unet.device)
    if controlnet.dtype != pipe.unet.dtype:  # (diffusers warns on a dtype move that changes nothing)
        controlnet.to(pipe.unet.dtype)
    return controlnet.requires_grad_(True)


def save_condition_encoder(encoder: ConditionEncoder, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into a temporary folder renamed to ``folder``."""
    config = {"out_channels": encoder.out_channels, "downscale": encoder.downscale,
              "in_channels": encoder.in_channels, "hidden_channels": list(encoder.hidden_channels)}

    def write(tmp: Path) -> None:
        files.save_tensors(tmp / WEIGHTS_FILE, encoder.state_dict())
        files.atomic_write_json(tmp / CONFIG_FILE, config)

    return files.atomic_write_folder(folder, write)


def load_condition_encoder(folder: str | os.PathLike) -> ConditionEncoder:
    """The encoder saved by :func:`save_condition_encoder`; AdapterLoadError when the folder is incomplete."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise AdapterLoadError(f"{folder} holds no condition encoder ({CONFIG_FILE} and {WEIGHTS_FILE}); "
                               "the run folder is incomplete")
    config = files.read_json(folder / CONFIG_FILE)
    try:
        encoder = ConditionEncoder(int(config["out_channels"]), int(config["downscale"]),
                                   int(config.get("in_channels", 3)), tuple(config["hidden_channels"]))
        encoder.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise AdapterLoadError(f"{folder} is not a valid condition encoder: {first}") from None
    return encoder.eval()


__all__ = ["CONDITION_COMPONENT", "ControlHook", "attach_condition_encoder", "condition_hook", "controlled",
           "detach_condition_encoder", "load_condition_encoder", "new_condition_encoder", "new_controlnet",
           "save_condition_encoder"]
