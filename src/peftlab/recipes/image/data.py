"""The data of the image recipes: instance images, cached class images, (target, control, caption) examples.

* ``--instance-data DIR`` (subject-driven): every image file in DIR (png, jpg, jpeg, webp, bmp), resized to the
  training resolution; or ``glyph:K``: 6 renderings of the unseen letter K in one font
  (:func:`peftlab.data.glyphs.subject_images`), the offline subject for ``tiny-digits``.
* Class images (prior preservation): generated once by the frozen base pipeline and cached under
  ``<cache>/class-images/<key>/`` (``class-<i>.png`` + ``manifest.json``), the key a sha256 of the model, the
  class prompt, the count, the seed, the resolution and the sampler settings; written into a temporary folder
  renamed into place, so a killed run never leaves a partial set that a later run would trust.
* ``--data`` (controllable): ``tiny-digits-edges`` (scikit-learn's handwritten digits, captions "a handwritten
  digit k"; the control maps are computed from the targets), a folder of images with an optional
  ``metadata.jsonl`` (``{"file_name": ..., "text": ..., "control_file": ...}`` per line, HF imagefolder style),
  or a ``.jsonl`` file of such rows (paths relative to the file). Missing control maps are computed from the
  target with :func:`peftlab.diffusion.control.make_control`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftlab import files
from peftlab.data import glyphs
from peftlab.errors import ConfigError, DataError, RecipeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GLYPH_PREFIX = "glyph:"
SUBJECT_COUNT = 6
EDGES_DATA = "tiny-digits-edges"
METADATA_FILE = "metadata.jsonl"
MANIFEST = "manifest.json"


def open_image(path: Path, what: str) -> Any:
    """An RGB PIL image (:func:`as_rgb`), or DataError naming the file (missing, truncated, not an image, or over
    PIL's decompression-bomb limit of 2 × ``Image.MAX_IMAGE_PIXELS`` pixels)."""
    from PIL import Image, UnidentifiedImageError

    from peftlab.diffusion.control import as_rgb

    try:
        with Image.open(path) as image:
            image.load()
            return as_rgb(image)
    except Image.DecompressionBombError as err:
        size = str(err).split(", could be")[0]  # "Image size (N pixels) exceeds limit of M pixels"
        raise DataError(f"{what}: {path} is too large to open safely: {size} (PIL's decompression-bomb guard); "
                        "downscale the image") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        raise DataError(f"{what}: {path} is not a readable image (missing, truncated, or not PNG/JPEG/WebP/BMP)") \
            from None


def image_files(folder: Path, flag: str) -> list[Path]:
    """The image files of ``folder`` (sorted by name), or DataError when it is not a folder or has none."""
    if not folder.is_dir():
        raise DataError(f"{flag} {folder} is not a folder; give a folder of images"
                        + (f" or {GLYPH_PREFIX}LETTER" if flag == "--instance-data" else ""))
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"{flag} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the training "
                        "images in it")
    return paths


def resize_all(images: list[Any], resolution: int) -> list[Any]:
    """Every image resized (bicubic) to resolution × resolution."""
    from PIL import Image

    return [im if im.size == (resolution, resolution) else im.resize((resolution, resolution),
                                                                      Image.Resampling.BICUBIC) for im in images]


def instance_images(spec: str, resolution: int) -> list[Any]:
    """The subject's images (RGB PIL, resolution²) from ``--instance-data``: a folder or ``glyph:K``."""
    if spec.startswith(GLYPH_PREFIX):
        letter = spec[len(GLYPH_PREFIX):]
        try:
            grey = glyphs.subject_images(letter, SUBJECT_COUNT)
        except ConfigError as err:  # not one letter A-Z
            raise DataError(f"--instance-data {spec}: {err}") from None
        return resize_all(glyphs.to_pil(grey), resolution)
    paths = image_files(Path(spec).expanduser(), "--instance-data")
    return resize_all([open_image(f, "--instance-data") for f in paths], resolution)


def pixels(images: list[Any]) -> Any:
    """RGB PIL images → (N, 3, H, W) float tensor in [−1, 1], the VAE's input."""
    import torch

    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2 - 1


# -- class images ------------------------------------------------------------------------------------------------
def class_cache_root() -> Path:
    """Where class images are cached: ``<cache>/class-images`` (``$PEFTLAB_CACHE``, default ``~/.cache/peftlab``)."""
    from peftlab.data.cache import cache_dir

    return cache_dir() / "class-images"


def class_key(model: str, prompt: str, count: int, seed: int, resolution: int, steps: int, guidance: float) -> str:
    """Content address of a class-image set: sha256 of what determines the images (first 24 hex digits)."""
    text = json.dumps({"model": model, "prompt": prompt, "count": count, "seed": seed, "resolution": resolution,
                       "steps": steps, "guidance": guidance}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def model_identity(name: str, path: str) -> str:
    """What names the base model in the class-image key: the name, plus the resolved folder and the time its
    UNet weights were written (a re-pretrained model at the same path gets new class images)."""
    folder = Path(path)
    weights = (folder / "unet").glob("*.safetensors") if folder.is_dir() else []
    stamps = sorted(str(p.stat().st_mtime_ns) for p in weights)
    return json.dumps([name, str(folder.resolve()) if folder.is_dir() else path, stamps])


def generate_images(pipe: Any, prompt: str, count: int, seed: int, resolution: int, steps: int,
                    guidance: float, batch_size: int = 16) -> list[Any]:
    """``count`` images of ``prompt`` from ``pipe`` (CPU generator seeded by ``seed``: the same on every device)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    out: list[Any] = []
    with torch.inference_mode():
        while len(out) < count:
            n = min(batch_size, count - len(out))
            out += pipe(prompt, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance,
                        height=resolution, width=resolution, generator=generator, output_type="pil").images
    return out


def class_images(pipe: Any, model: str, prompt: str, count: int, seed: int, resolution: int, steps: int,
                 guidance: float, root: Path | None = None) -> tuple[list[Any], bool]:
    """(images, reused): the cached class images of this set, generated by ``pipe`` (the frozen base) if missing."""
    key = class_key(model, prompt, count, seed, resolution, steps, guidance)
    folder = (root or class_cache_root()) / key
    names = [f"class-{i:04d}.png" for i in range(count)]
    if (folder / MANIFEST).is_file() and all((folder / n).is_file() for n in names):
        try:
            return [open_image(folder / n, "class image cache") for n in names], True
        except DataError:
            pass  # a damaged cache entry is generated again
    images = generate_images(pipe, prompt, count, seed, resolution, steps, guidance)

    def write(tmp: Path) -> None:
        for name, image in zip(names, images, strict=True):
            files.atomic_write_image(tmp / name, image)
        files.atomic_write_json(tmp / MANIFEST, {"model": model, "prompt": prompt, "count": count, "seed": seed,
                                              "resolution": resolution, "steps": steps, "guidance": guidance})

    files.atomic_write_folder(folder, write)
    return images, False


# -- controllable examples ---------------------------------------------------------------------------------------
@dataclass
class ControlExamples:
    """Targets and their control maps (RGB PIL, resolution²), captions, and glyph labels when known."""

    targets: list[Any]
    controls: list[Any]
    captions: list[str]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, index: list[int]) -> ControlExamples:
        return ControlExamples([self.targets[i] for i in index], [self.controls[i] for i in index],
                               [self.captions[i] for i in index],
                               None if self.labels is None else [self.labels[i] for i in index])


def _rows(data: str) -> tuple[Path, list[dict[str, Any]]]:
    """(base folder, rows {file_name, text, control_file}) of a folder or a .jsonl file."""
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix != ".jsonl":
            raise DataError(f"--data {data}: a data file must be .jsonl with file_name / text / control_file rows")
        base, lines = path.parent, path.read_text().splitlines()
    else:
        paths = image_files(path, "--data")
        base = path
        meta = path / METADATA_FILE
        lines = meta.read_text().splitlines() if meta.is_file() else [json.dumps({"file_name": f.name}) for f in paths]
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"--data {data}: line {number} is not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"--data {data}: line {number} needs a \"file_name\" (the target image)")
        rows.append(row)
    if not rows:
        raise DataError(f"--data {data} has no examples")
    return base, rows


def check_controls(controls: list[Any], control: str, data: str) -> None:
    """DataError when no control map carries any information (all constant): nothing to condition on."""
    flat = [np.asarray(c.convert("L")) for c in controls]
    if all(f.min() == f.max() for f in flat):
        raise DataError(f"--data {data}: the {control} control maps of all {len(flat)} images are blank (constant), "
                        f"so the data cannot provide a {control} control; use images with visible structure or "
                        "another --control")


def given_controls(data: str, base: Path, rows: list[dict[str, Any]], targets: list[Any]) -> list[Any]:
    """The ``control_file`` image of every row; DataError when some rows lack one or a map's size differs from
    its target's (a control map is aligned with its target pixel by pixel, so a different size is a mistake)."""
    missing = [r["file_name"] for r in rows if not isinstance(r.get("control_file"), str)]
    if missing:
        raise DataError(f"--data {data}: {len(missing)} of {len(rows)} rows have no \"control_file\" (first: "
                        f"{missing[0]}); give one for every row, or for none (then --control computes them)")
    controls = [open_image(base / r["control_file"], "--data") for r in rows]
    for row, target, control in zip(rows, targets, controls, strict=True):
        if control.size != target.size:
            raise DataError(f"--data {data}: control {row['control_file']} is {control.size[0]}×{control.size[1]} "
                            f"but its target {row['file_name']} is {target.size[0]}×{target.size[1]}; a control map "
                            "must have its target's size")
    return controls


def control_examples(data: str, control: str, resolution: int, limit: int | None, seed: int) -> ControlExamples:
    """The training examples of ``--data`` with their ``control`` maps (computed from the targets if missing)."""
    from peftlab.diffusion.control import make_control

    if data == EDGES_DATA:
        digits = glyphs.digit_images()
        order = np.random.default_rng(seed).permutation(len(digits))[: limit or len(digits)]
        subset = digits.subset(order)
        targets = resize_all(glyphs.to_pil(subset.images), resolution)
        examples = ControlExamples(targets, [], subset.captions(), [int(k) for k in subset.labels])
    else:
        base, rows = _rows(data)
        rows = rows[: limit or len(rows)]
        originals = [open_image(base / r["file_name"], "--data") for r in rows]
        captions = [str(r.get("text", "")) for r in rows]
        examples = ControlExamples(resize_all(originals, resolution), [], captions)
        given = [r.get("control_file") for r in rows]
        if any(isinstance(g, str) for g in given):
            controls = given_controls(data, base, rows, originals)
            examples.controls = resize_all(controls, resolution)
    if not examples.controls:
        examples.controls = [make_control(t, control) for t in examples.targets]
    check_controls(examples.controls, control, data)
    return examples


def held_out_edges(control: str, resolution: int, count: int, from_end: bool = False) -> ControlExamples:
    """``count`` digits the glyph classifier never saw (one per class in turn), with their control maps; each
    class's first ones, or (``from_end``, a validation score) its last ones."""
    from peftlab.diffusion.control import make_control
    from peftlab.diffusion.image_metrics import held_out_digits

    digits = held_out_digits()
    index = [int(np.flatnonzero(digits.labels == k % 10)[-1 - k // 10 if from_end else k // 10]) for k in range(count)]
    subset = digits.subset(np.array(index))
    targets = resize_all(glyphs.to_pil(subset.images), resolution)
    return ControlExamples(targets, [make_control(t, control) for t in targets], subset.captions(),
                           [int(k) for k in subset.labels])


def check_data_option(data: str | None) -> str:
    if not data:
        raise RecipeError(f"--data is required for --task controllable: {EDGES_DATA}, a folder of images, or a "
                          ".jsonl file")
    return data


__all__ = ["ControlExamples", "class_images", "control_examples", "held_out_edges", "instance_images", "pixels"]
