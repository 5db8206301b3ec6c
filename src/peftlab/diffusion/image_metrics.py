"""Image metrics for subject-driven and controllable generation, with and without an encoder model.

Design notes: ``docs/design.md``, section peftlab.diffusion.image_metrics.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftlab.data import glyphs
from peftlab.diffusion import control as controls
from peftlab.errors import ConfigError, PeftlabError

CLASSIFIER_VERSION = 2
LBFGS_ITERATIONS = 50  # stopped early: as accurate on held-out glyphs as 300 iterations, 3x faster to fit
HOG_CELL = 8
REDUCED_SIZE = 16
LETTERS_PER_CLASS = 60
CLASSIFIER_ARRAYS = {"mean", "scale", "coef", "intercept", "classes", "feature_mean"}


@dataclass
class ImageMetrics:
    """Computed metric values, and the metrics that could not be computed with the reason for each."""

    values: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    per_sample: dict[str, list[float]] = field(default_factory=dict)  # a value's per-sample terms (it is their mean)

    def update(self, other: ImageMetrics) -> ImageMetrics:
        """Add ``other``'s values, per-sample values and skipped entries to this one (in place); return self."""
        self.values.update(other.values)
        self.skipped.update(other.skipped)
        self.per_sample.update(other.per_sample)
        return self

    def add_mean(self, name: str, per_sample: Sequence[float]) -> None:
        """Record ``name`` as the mean of its per-sample values (kept in ``per_sample``)."""
        self.per_sample[name] = [float(v) for v in per_sample]
        self.values[name] = float(np.mean(self.per_sample[name]))

    def as_dict(self) -> dict[str, Any]:
        return {**self.values, "skipped": dict(self.skipped)} if self.skipped else dict(self.values)


# -- stand-in features and classifier -----------------------------------------------------------------------
def glyph_features(images) -> np.ndarray:
    """f(x): HOG ⊕ 16×16 pixels of each image (any of :func:`peftlab.data.glyphs.to_array`'s inputs), (N, 580)."""
    from skimage.feature import hog

    grey = glyphs.to_array(images)
    if len(grey) == 0:
        raise ConfigError("no images to score")
    hogs = np.stack([hog(g, orientations=9, pixels_per_cell=(HOG_CELL, HOG_CELL), cells_per_block=(2, 2))
                     for g in grey])
    return np.concatenate([hogs, glyphs.upscale(grey, REDUCED_SIZE).reshape(len(grey), -1)], axis=1)


def _digit_split() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    labels = glyphs.digit_images(8).labels
    return train_test_split(np.arange(len(labels)), test_size=0.25, random_state=0, stratify=labels)


def held_out_digits() -> glyphs.GlyphSet:
    """The 25 % of the digits the stand-in classifier never saw (stratified split, seed 0)."""
    return glyphs.digit_images().subset(_digit_split()[1])


def _fit_classifier() -> dict[str, np.ndarray]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    digits = glyphs.digit_images()
    data = glyphs.concat(digits.subset(_digit_split()[0]), glyphs.letter_images(per_letter=LETTERS_PER_CLASS, seed=1))
    features = glyph_features(data.images)
    scaler = StandardScaler().fit(features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the early stop is deliberate
        model = LogisticRegression(C=0.1, max_iter=LBFGS_ITERATIONS).fit(scaler.transform(features), data.labels)
    return {"mean": scaler.mean_, "scale": scaler.scale_, "coef": model.coef_, "intercept": model.intercept_,
            "classes": model.classes_.astype(np.int64), "feature_mean": features.mean(axis=0)}


@functools.lru_cache(maxsize=4)
def _classifier(cache_root: str | None = None) -> dict[str, np.ndarray]:
    """The fitted classifier's arrays, from the cache or fitted (~15 s) and cached."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.numpy import load_file, save

    from peftlab.data.cache import cache_dir
    from peftlab.files import atomic_write_bytes

    path = Path(cache_root or cache_dir()) / "models" / f"glyph-classifier-v{CLASSIFIER_VERSION}.safetensors"
    if path.is_file():
        try:
            arrays = load_file(str(path))
            if set(arrays) == CLASSIFIER_ARRAYS:
                return arrays
        except (SafetensorError, OSError):
            pass  # a corrupt or foreign cache file is refitted and replaced
    arrays = {k: np.ascontiguousarray(v, dtype=np.int64 if k == "classes" else np.float32)
              for k, v in _fit_classifier().items()}
    atomic_write_bytes(path, save(arrays))
    return arrays


def predict_classes(images) -> np.ndarray:
    """The stand-in classifier's class id (index into ``glyphs.CLASS_NAMES``) for each image."""
    c = _classifier()
    logits = ((glyph_features(images) - c["mean"]) / c["scale"]) @ c["coef"].T + c["intercept"]
    return c["classes"][logits.argmax(axis=1)]


def _label_ids(labels: Sequence[int | str], count: int) -> np.ndarray:
    if len(labels) != count:
        raise ConfigError(f"got {count} images but {len(labels)} labels; give one label per image")
    ids = []
    for label in labels:
        if isinstance(label, str) and label in glyphs.CLASS_NAMES:
            ids.append(glyphs.class_id(label))
        elif isinstance(label, (int, np.integer)) and 0 <= label < len(glyphs.CLASS_NAMES):
            ids.append(int(label))
        else:
            raise ConfigError(f"unknown glyph label {label!r}: use 0-{len(glyphs.CLASS_NAMES) - 1} or one of 0-9, A-Z")
    return np.array(ids)


def class_accuracy(images, labels: Sequence[int | str]) -> float:
    """Share of ``images`` the stand-in classifier assigns to their ``labels`` (class ids or names "3", "A")."""
    grey = glyphs.to_array(images)
    return float((predict_classes(grey) == _label_ids(labels, len(grey))).mean())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_to_references(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row i of ``a`` (N, d): mean_j cos(aᵢ, bⱼ) over the rows of ``b`` (M, d)."""
    return (_unit(np.asarray(a, np.float64)) @ _unit(np.asarray(b, np.float64)).T).mean(axis=1)


def mean_pairwise_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """mean_{i,j} cos(aᵢ, bⱼ) over all rows of ``a`` (N, d) and ``b`` (M, d)."""
    return float(cosine_to_references(a, b).mean())


def subject_similarity_per_sample(images, reference_images) -> np.ndarray:
    """Per image x: mean over references r of cos(f(x) − μ, f(r) − μ) (:func:`subject_similarity` is their mean)."""
    mu = _classifier()["feature_mean"]
    return cosine_to_references(glyph_features(images) - mu, glyph_features(reference_images) - mu)


def subject_similarity(images, reference_images) -> float:
    """Mean cos(f(x) − μ, f(r) − μ) over all (image, reference) pairs: the DINO / CLIP-I stand-in."""
    return float(subject_similarity_per_sample(images, reference_images).mean())


# -- encoder metrics (CLIP, DINO) ---------------------------------------------------------------------------
def _rgb(images) -> list:
    """Images as RGB PIL images for an encoder's processor (colour kept; grey arrays repeated on 3 channels)."""
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3:
        return [Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)) for x in images]
    if all(isinstance(im, Image.Image) for im in images):
        return [im.convert("RGB") for im in images]
    return glyphs.to_pil(glyphs.to_array(images, None))


def _load(loader, encoder: str | os.PathLike):
    """``loader.from_pretrained(encoder)`` without remote code and with transformers quiet; the error on failure."""
    from peftlab.base_models import quiet_transformers

    with quiet_transformers():
        return loader.from_pretrained(str(encoder), trust_remote_code=False)


def _load_failure(encoder, err: BaseException) -> str:
    return f"encoder {str(encoder)!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]})"


def clip_scores(images, prompts: str | Sequence[str] | None = None, reference_images=None,
                encoder: str | os.PathLike | None = None) -> ImageMetrics:
    """CLIP-I (against ``reference_images``) and CLIP-T (against ``prompts``, one per image or one for all)."""
    names = [n for n, given in (("clip_i", reference_images is not None), ("clip_t", prompts is not None)) if given]
    if encoder is None:
        return ImageMetrics(skipped={n: "no CLIP encoder given (--eval-encoder)" for n in names})
    import torch
    from transformers import AutoProcessor, CLIPModel

    try:
        model, processor = _load(CLIPModel, encoder).eval(), _load(AutoProcessor, encoder)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError, PeftlabError) as err:
        return ImageMetrics(skipped={n: _load_failure(encoder, err) for n in names})
    pictures = _rgb(images)
    result = ImageMetrics()
    with torch.no_grad():
        embed = model.get_image_features(**processor(images=pictures, return_tensors="pt"))
        embed = getattr(embed, "pooler_output", embed).numpy()
        if reference_images is not None:
            refs = model.get_image_features(**processor(images=_rgb(reference_images), return_tensors="pt"))
            result.values["clip_i"] = mean_pairwise_cosine(embed, getattr(refs, "pooler_output", refs).numpy())
        if prompts is not None:
            texts = [prompts] * len(pictures) if isinstance(prompts, str) else list(prompts)
            if len(texts) != len(pictures):
                raise ConfigError(f"got {len(pictures)} images but {len(texts)} prompts; give one or one per image")
            text = model.get_text_features(**processor(text=texts, return_tensors="pt", padding=True))
            text = getattr(text, "pooler_output", text).numpy()
            result.values["clip_t"] = float((_unit(embed) * _unit(text)).sum(axis=1).mean())
    return result


def dino_similarity(images, reference_images, encoder: str | os.PathLike | None = None) -> ImageMetrics:
    """DINO: mean pairwise cosine of the encoder's CLS tokens between ``images`` and ``reference_images``."""
    if encoder is None:
        return ImageMetrics(skipped={"dino": "no DINO encoder given (--eval-encoder)"})
    import torch
    from transformers import AutoImageProcessor, AutoModel

    try:
        model, processor = _load(AutoModel, encoder).eval(), _load(AutoImageProcessor, encoder)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError, PeftlabError) as err:
        return ImageMetrics(skipped={"dino": _load_failure(encoder, err)})
    with torch.no_grad():
        cls = [model(**processor(images=_rgb(x), return_tensors="pt")).last_hidden_state[:, 0].numpy()
               for x in (images, reference_images)]
    return ImageMetrics(values={"dino": mean_pairwise_cosine(*cls)})


# -- control fidelity ---------------------------------------------------------------------------------------
def edge_f1_pair(predicted: np.ndarray, target: np.ndarray, tolerance: float = 1.0) -> float:
    """F1 between two boolean edge maps, an edge pixel counting as matched within ``tolerance`` pixels."""
    from scipy.ndimage import distance_transform_edt

    predicted, target = np.asarray(predicted, bool), np.asarray(target, bool)
    if predicted.shape != target.shape:
        raise ConfigError(f"edge maps differ in shape: {predicted.shape} vs {target.shape}; resize the images first")
    if not predicted.any() or not target.any():
        return float(not predicted.any() and not target.any())
    precision = (distance_transform_edt(~target)[predicted] <= tolerance).mean()
    recall = (distance_transform_edt(~predicted)[target] <= tolerance).mean()
    return float(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))


def ssim(a, b) -> float:
    """Mean SSIM (data range 1) over pairs of grey images in [0, 1]."""
    return float(np.mean(ssim_per_pair(a, b)))


def ssim_per_pair(a, b) -> list[float]:
    """SSIM (data range 1) of each pair of grey images in [0, 1] (skimage's ``structural_similarity``)."""
    from skimage.metrics import structural_similarity

    a, b = glyphs.to_array(a, None), glyphs.to_array(b, None)
    if a.shape != b.shape:
        raise ConfigError(f"images differ in size: {a.shape[1:]} vs {b.shape[1:]}; resize them first")
    if min(a.shape[1:]) < 7:
        raise ConfigError(f"SSIM needs images of at least 7×7 pixels, got {a.shape[1:]}")
    return [float(structural_similarity(x, y, data_range=1.0)) for x, y in zip(a, b, strict=True)]


def control_fidelity(outputs, control_images, control: str = "canny", tolerance: float = 1.0,
                     reference_landmarks: Sequence[np.ndarray] | None = None) -> ImageMetrics:
    """How well ``outputs`` follow ``control_images`` (the control maps they were generated from).

    canny: ``edge_f1`` and ``edge_ssim`` between the control edges (> 0.5) and the output's canny edges;
    segmentation: ``segmentation_ssim`` between the control map and the output's map; landmarks:
    ``landmark_error`` (pixels) between ``reference_landmarks`` and the landmarks found in the output.
    """
    controls.check_control(control)
    result = ImageMetrics()
    out = glyphs.to_array(outputs, None)
    if control == "landmarks":
        try:
            found = [controls.face_landmarks(o) for o in out]
        except PeftlabError as err:
            return ImageMetrics(skipped={"landmark_error": str(err)})
        if reference_landmarks is None:
            reference_landmarks = [controls.face_landmarks(c) for c in glyphs.to_array(control_images, None)]
        if len(reference_landmarks) != len(found):
            raise ConfigError(f"{len(found)} outputs but {len(reference_landmarks)} landmark sets; give one per output")
        errors = [np.linalg.norm(f - r, axis=1).mean() for f, r in zip(found, reference_landmarks, strict=True)
                  if f is not None and r is not None]
        result.values["landmark_faces_found"] = float(np.mean([f is not None for f in found]))
        if errors:
            result.values["landmark_error"] = float(np.mean(errors))
        else:
            result.skipped["landmark_error"] = "no face found in the outputs"
        return result
    ctrl = glyphs.to_array(control_images, None)
    if ctrl.shape != out.shape:
        raise ConfigError(f"{len(out)} outputs of size {out.shape[1:]} vs {len(ctrl)} controls of size "
                          f"{ctrl.shape[1:]}: give one control per output, at the output's size")
    if control == "canny":
        edges = np.stack([controls.canny_edges(o) for o in out])
        pairs = zip(edges, ctrl > 0.5, strict=True)
        result.add_mean("edge_f1", [edge_f1_pair(e, c, tolerance) for e, c in pairs])
        result.values["edge_ssim"] = ssim(ctrl, edges.astype(np.float32))
    else:
        result.add_mean("segmentation_ssim", ssim_per_pair(ctrl, np.stack([controls.segmentation_map(o) for o in out])))
    return result
