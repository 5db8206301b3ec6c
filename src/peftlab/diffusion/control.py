"""Control images computed from target images, and the condition encoder of controllable generation.

Control maps (grey images in [0, 1], the target's size):

* ``canny``: binary edges of the grey image (``skimage.feature.canny``, Gaussian σ = 1), edges = 1;
* ``landmarks``: the 68 facial landmarks of dlib's shape predictor (the model file ships in the
  ``face-recognition-models`` package), drawn as 1-pixel dots on black; needs ``dlib-bin`` and
  ``face-recognition-models`` (optional: :class:`~peftlab.errors.UnsupportedError` names the install line);
* ``segmentation``: a documented stand-in, not a semantic segmentation: the grey levels are split into
  3 regions by multi-level Otsu thresholds (``skimage.filters.threshold_multiotsu``), shown as 0, ½, 1.

:class:`ConditionEncoder` is the trainable module that injects such a map into a UNet.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from peftlab.data import glyphs
from peftlab.errors import ConfigError, DataError, UnsupportedError

CONTROLS = ("canny", "landmarks", "segmentation")
CANNY_SIGMA = 1.0
SEGMENTATION_REGIONS = 3
DLIB_INSTALL = "pip install dlib-bin==20.0.1.post1 face-recognition-models==0.3.0"


def check_control(control: str) -> str:
    """``control`` if it is a known control type, else ConfigError listing the choices."""
    if control not in CONTROLS:
        raise ConfigError(f"unknown control {control!r}; choose one of: {', '.join(CONTROLS)}")
    return control


WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16-bit, 32-bit integer and float greyscale


def as_rgb(image: Any) -> Any:
    """``image`` as RGB PIL. Greyscale wider than 8 bits (PIL modes I;16, I, F) is first scaled by its own range,
    min..max → 0..255 (a constant image → 0), since PIL's ``convert`` clips it at 255 (16-bit values above 255
    would all turn white); 8-bit images are converted unchanged."""
    from PIL import Image

    if image.mode not in WIDE_GREY_MODES:
        return image.convert("RGB")
    grey = np.asarray(image, dtype=np.float64)
    low, high = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 0.0)
    scaled = (grey - low) * (255.0 / (high - low)) if high > low else np.zeros_like(grey)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L").convert("RGB")


def _grey(image) -> np.ndarray:
    """One image (PIL or array) → (h, w) grey float in [0, 1], at its own size (wide greyscale: :func:`as_rgb`)."""
    return glyphs.to_array(as_rgb(image) if getattr(image, "mode", None) in WIDE_GREY_MODES else image, None)[0]


def canny_edges(image, sigma: float = CANNY_SIGMA) -> np.ndarray:
    """Boolean canny edge map of the grey image (``skimage.feature.canny``)."""
    from skimage.feature import canny as skimage_canny

    return skimage_canny(_grey(image), sigma=sigma)


def segmentation_map(image, regions: int = SEGMENTATION_REGIONS) -> np.ndarray:
    """Grey levels split into ``regions`` classes by multi-Otsu thresholds, as values k/(regions − 1).

    An image with fewer distinct levels than ``regions`` gets fewer classes; a constant image is all 0.
    """
    from skimage.filters import threshold_multiotsu

    grey = _grey(image)
    for k in range(regions, 1, -1):
        try:
            thresholds = threshold_multiotsu(grey, classes=k)
        except ValueError:  # too few distinct grey levels for k classes
            continue
        return (np.digitize(grey, thresholds) / (regions - 1)).astype(np.float32)
    return np.zeros_like(grey)


@functools.lru_cache(maxsize=1)
def _dlib_models():
    """dlib's face detector and 68-point shape predictor, or UnsupportedError with the install line."""
    spec = importlib.util.find_spec("face_recognition_models")
    if importlib.util.find_spec("dlib") is None or spec is None or not spec.submodule_search_locations:
        raise UnsupportedError(f"face landmarks need dlib and its 68-point model: {DLIB_INSTALL}")
    import dlib

    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        raise UnsupportedError(f"{path} is missing; reinstall: {DLIB_INSTALL}")
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path))


def face_landmarks(image) -> np.ndarray | None:
    """(68, 2) landmark coordinates (x, y) in pixels of the largest face found, or None when there is none."""
    detector, predictor = _dlib_models()
    grey = (np.clip(_grey(image), 0, 1) * 255).astype(np.uint8)
    faces = list(detector(grey, 1))
    if not faces:
        return None
    face = max(faces, key=lambda r: r.width() * r.height())
    shape = predictor(grey, face)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def landmark_map(image) -> np.ndarray:
    """The 68 landmarks of the image's face drawn as 1-pixel dots (value 1) on black; DataError without a face."""
    points = face_landmarks(image)
    grey = _grey(image)
    if points is None:
        raise DataError("no face found in the image: the landmarks control needs a visible frontal face")
    out = np.zeros_like(grey)
    xy = np.clip(points.round().astype(int), 0, [grey.shape[1] - 1, grey.shape[0] - 1])
    out[xy[:, 1], xy[:, 0]] = 1.0
    return out


def _as_image(grey: np.ndarray):
    return glyphs.to_pil(grey[None].astype(np.float32))[0]


def canny(image):
    """The canny control image (RGB PIL, white edges on black) of a target image."""
    return _as_image(canny_edges(image).astype(np.float32))


def landmarks(image):
    """The landmarks control image (RGB PIL, white dots on black) of a target face image."""
    return _as_image(landmark_map(image))


def segmentation(image):
    """The segmentation stand-in control image (RGB PIL, three grey levels) of a target image."""
    return _as_image(segmentation_map(image))


def make_control(image, control: str):
    """The ``control`` image (one of :data:`CONTROLS`) computed from a target image."""
    return {"canny": canny, "landmarks": landmarks, "segmentation": segmentation}[check_control(control)](image)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (ControlNet's "zero convolution"); return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ConditionEncoder(nn.Module):
    """E_φ: a control image c (B, 3, H, W) → a feature map (B, C, H/f, W/f) added to the UNet's first features.

    With z_t the noisy latent, the UNet's first feature map becomes

        h₀ = conv_in(z_t) + E_φ(c),

    so C is the UNet's first block width (``block_out_channels[0]``) and f its latent downscale (the VAE
    factor: 8 for Stable Diffusion, 4 for ``tiny-digits``). E_φ is ControlNet's small "hint" encoder:
    Conv3×3(3→c₀), then for each of the k = log₂ f halvings Conv3×3(cᵢ₋₁→cᵢ₋₁) and a stride-2 Conv3×3(cᵢ₋₁→cᵢ),
    SiLU after each, then a 1×1 convolution Z(c_k→C) whose weight and bias are zero. Because Z = 0 at
    initialisation, E_φ(c) = 0 and training starts exactly at the base model (the controllable-generation
    setting of OFT / HRA, where this encoder is trained together with the method's UNet adapters).
    """

    def __init__(self, out_channels: int, downscale: int = 8, in_channels: int = 3,
                 hidden_channels: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if downscale < 1 or downscale & (downscale - 1):
            raise ConfigError(f"ConditionEncoder downscale must be a power of two, got {downscale}")
        halvings = int(math.log2(downscale))
        hidden = tuple(hidden_channels or (16, 32, 96, 256, 256, 256)[: halvings + 1])
        if len(hidden) != halvings + 1 or min(hidden) < 1 or out_channels < 1:
            raise ConfigError(f"ConditionEncoder needs {halvings + 1} positive hidden widths for downscale "
                              f"{downscale} and out_channels >= 1, got {hidden} and {out_channels}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden[0], 3, padding=1), nn.SiLU()]
        for previous, width in zip(hidden[:-1], hidden[1:], strict=True):
            layers += [nn.Conv2d(previous, previous, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(previous, width, 3, padding=1, stride=2), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.zero_conv = zero_module(nn.Conv2d(hidden[-1], out_channels, 1))
        self.in_channels, self.out_channels, self.downscale = in_channels, out_channels, downscale
        self.hidden_channels = hidden

    @classmethod
    def for_unet(cls, unet: nn.Module, downscale: int, **kwargs) -> ConditionEncoder:
        """An encoder whose output matches ``unet``'s first feature map (diffusers ``UNet2DConditionModel``)."""
        return cls(unet.config.block_out_channels[0], downscale, **kwargs)

    def forward(self, control: Tensor) -> Tensor:
        if control.ndim != 4 or control.shape[1] != self.in_channels:
            raise ConfigError(f"control images must be (batch, {self.in_channels}, H, W), got {tuple(control.shape)}")
        if control.shape[-1] % self.downscale or control.shape[-2] % self.downscale:
            raise ConfigError(f"control image size {tuple(control.shape[-2:])} is not divisible by the latent "
                              f"downscale {self.downscale}")
        return self.zero_conv(self.body(control))


def control_tensor(images, size: int | None = None) -> Tensor:
    """Control images → (N, 3, h, w) float tensor in [0, 1] (grey repeated on 3 channels), for the encoder."""
    grey = glyphs.to_array(images, size)
    return torch.from_numpy(grey)[:, None].repeat(1, 3, 1, 1)
