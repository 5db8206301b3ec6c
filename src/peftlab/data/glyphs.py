"""Packaged images for the offline image models: handwritten digits and printed letters, with captions.

Nothing is downloaded: the digits are scikit-learn's 1,797 handwritten digits (8×8, UCI optical recognition
of handwritten digits), upscaled bilinearly to ``size``×``size``; the letters are rendered with Pillow from
the DejaVu fonts that matplotlib ships, each with a random font, size, offset and small rotation.

Images are float32 arrays in [0, 1], shape (N, size, size), ink = 1 on a black background. Class ids:
digits ``0``–``9`` are 0–9, letters ``A``–``Z`` are 10–35 (:data:`CLASS_NAMES`). :func:`caption` gives the
text prompt of a class ("a handwritten digit 3", "a printed letter A").
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peftlab.errors import ConfigError

IMAGE_SIZE = 32
DIGITS = string.digits
LETTERS = string.ascii_uppercase
CLASS_NAMES: tuple[str, ...] = tuple(DIGITS + LETTERS)
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Bold.ttf")


@dataclass(frozen=True)
class GlyphSet:
    """Images (N, size, size) in [0, 1] with their class ids (N,), indexing :data:`CLASS_NAMES`."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def captions(self) -> list[str]:
        """One caption per image, from its class."""
        return [caption(int(label)) for label in self.labels]

    def subset(self, index: np.ndarray | slice) -> GlyphSet:
        return GlyphSet(self.images[index], self.labels[index])


def caption(label: int | str) -> str:
    """The prompt of a class: ``"a handwritten digit 3"`` for a digit, ``"a printed letter A"`` for a letter."""
    name = CLASS_NAMES[label] if isinstance(label, int) else label
    if name not in CLASS_NAMES:
        raise ConfigError(f"unknown glyph class {name!r}; known: digits 0-9 and letters A-Z")
    return f"a handwritten digit {name}" if name in DIGITS else f"a printed letter {name}"


def class_id(name: str) -> int:
    """The id of a class name (``"3"`` → 3, ``"A"`` → 10)."""
    return CLASS_NAMES.index(name)


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, h, w) arrays to (N, size, size) (torch's ``interpolate``, ``align_corners=False``)."""
    import torch
    import torch.nn.functional as F

    if images.shape[-1] == size and images.shape[-2] == size:
        return images.astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()


def digit_images(size: int = IMAGE_SIZE) -> GlyphSet:
    """scikit-learn's 1,797 handwritten digits (values 0–16 → [0, 1]), upscaled to ``size``×``size``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return GlyphSet(upscale(digits.images / 16.0, size), digits.target.astype(np.int64))


def _font_path(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


def render_glyph(char: str, rng: np.random.Generator, size: int = IMAGE_SIZE, font: str | None = None) -> np.ndarray:
    """One printed glyph: random font of :data:`FONTS` (or ``font``), height 55–80 % of ``size``, offset ±10 %,
    rotation ±10°."""
    from PIL import Image, ImageDraw, ImageFont

    scale = 4  # draw large, then reduce with antialiasing
    canvas = size * scale
    name = font or FONTS[rng.integers(len(FONTS))]
    font = ImageFont.truetype(str(_font_path(name)), int(canvas * rng.uniform(0.55, 0.8)))
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    shift = rng.uniform(-0.1, 0.1, size=2) * canvas
    x = (canvas - (right - left)) / 2 - left + shift[0]
    y = (canvas - (bottom - top)) / 2 - top + shift[1]
    draw.text((x, y), char, fill=255, font=font)
    image = image.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR)
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def letter_images(letters: str = LETTERS, per_letter: int = 60, seed: int = 0, size: int = IMAGE_SIZE) -> GlyphSet:
    """``per_letter`` rendered variants of each of ``letters``, deterministic given ``seed``."""
    unknown = [c for c in letters if c not in LETTERS]
    if unknown:
        raise ConfigError(f"letters must be upper-case A-Z, got {''.join(unknown)!r}")
    rng = np.random.default_rng(seed)
    chars = [c for c in letters for _ in range(per_letter)]
    images = np.stack([render_glyph(c, rng, size) for c in chars]) if chars else np.zeros((0, size, size), np.float32)
    return GlyphSet(images, np.array([class_id(c) for c in chars], dtype=np.int64))


SUBJECT_FONT = "DejaVuSerif-Bold.ttf"  # one "writer": every subject image uses this font


def subject_images(letter: str, count: int = 6, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """``count`` images of one unseen glyph in one style (:data:`SUBJECT_FONT`, small random size, offset and
    rotation): the offline subject of subject-driven fine-tuning (DreamBooth's 3-5 photos of one dog)."""
    if len(letter) != 1 or letter not in LETTERS:
        raise ConfigError(f"the subject glyph must be one upper-case letter A-Z, got {letter!r}")
    rng = np.random.default_rng(seed)
    return np.stack([render_glyph(letter, rng, size, font=SUBJECT_FONT) for _ in range(count)])


def write_subject_folder(letter: str, folder, count: int = 6, seed: int = 0) -> list[Path]:
    """Write :func:`subject_images` as ``<letter>-<i>.png`` into ``folder`` (atomically, one file at a time)."""
    from peftlab.files import atomic_write_image

    folder = Path(folder)
    return [atomic_write_image(folder / f"{letter}-{i}.png", image)
            for i, image in enumerate(to_pil(subject_images(letter, count, seed)))]


def concat(*sets: GlyphSet) -> GlyphSet:
    """The union of several glyph sets, in order."""
    return GlyphSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]))


def to_pil(images: np.ndarray) -> list:
    """(N, h, w) arrays in [0, 1] → RGB PIL images (grey levels repeated on the three channels)."""
    from PIL import Image

    grey = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return [Image.fromarray(g, mode="L").convert("RGB") for g in grey]


def to_array(images, size: int | None = IMAGE_SIZE) -> np.ndarray:
    """PIL images, (N, h, w) / (N, h, w, 3) arrays in [0, 1], or one such image → (N, size, size) grey in [0, 1].

    RGB is reduced to its channel mean; other sizes are resized bilinearly (``size=None`` keeps the size, which
    must then be the same for all images). A float32 (N, h, w) array of the right size is returned as it is, so a
    batch normalised once (as the image recipes' scoring does) passes through every metric without a copy.
    """
    from PIL import Image

    if isinstance(images, np.ndarray) and images.dtype == np.float32 and images.ndim in (2, 3) and (
            size is None or images.shape[-2:] == (size, size)):
        return images if images.ndim == 3 else images[None]  # normalised already: passed through, not copied
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 2):
        images = [images]
    arrays = []
    for image in images:
        if isinstance(image, Image.Image):
            a = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        else:
            a = np.asarray(image, dtype=np.float32)
            if a.ndim == 3:  # (h, w, channels) as PIL / diffusers' numpy output, else (channels, h, w)
                a = a[..., :3].mean(axis=-1) if a.shape[-1] in (1, 3, 4) else a[:3].mean(axis=0)
        if size is not None and a.shape != (size, size):
            a = upscale(a[None], size)[0]
        arrays.append(a)
    if not arrays:
        return np.zeros((0, size or IMAGE_SIZE, size or IMAGE_SIZE), np.float32)
    if len({a.shape for a in arrays}) > 1:
        raise ConfigError(f"images differ in size ({sorted({a.shape for a in arrays})}); resize them to one size")
    return np.stack(arrays).astype(np.float32)
