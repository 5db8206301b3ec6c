"""Image metrics on inputs with known answers: stand-in classifier and features, edge F1, SSIM, encoders, controls."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from peftlab.data import glyphs
from peftlab.diffusion import control, image_metrics
from peftlab.diffusion.image_metrics import ImageMetrics
from peftlab.errors import ConfigError, UnsupportedError


@pytest.fixture(scope="module")
def held_out():
    return image_metrics.held_out_digits()


def test_classifier_is_accurate_on_held_out_digits(held_out):
    assert len(held_out) == 450
    assert image_metrics.class_accuracy(held_out.images, held_out.labels) > 0.9
    names = [glyphs.CLASS_NAMES[k] for k in held_out.labels[:40]]  # labels as class names, images as PIL
    assert image_metrics.class_accuracy(glyphs.to_pil(held_out.images[:40]), names) > 0.9
    wrong = (held_out.labels[:40] + 1) % 10
    assert image_metrics.class_accuracy(held_out.images[:40], wrong) < 0.2


def test_classifier_reads_unseen_renderings_of_letters():
    letters = glyphs.letter_images("KQXZ", per_letter=5, seed=123)
    assert image_metrics.class_accuracy(letters.images, letters.labels) >= 0.8


def test_class_accuracy_rejects_bad_labels(held_out):
    with pytest.raises(ConfigError, match="2 images but 1 labels"):
        image_metrics.class_accuracy(held_out.images[:2], [3])
    with pytest.raises(ConfigError, match="unknown glyph label"):
        image_metrics.class_accuracy(held_out.images[:1], ["a"])


def test_subject_similarity_is_one_for_identical_images_and_prefers_the_same_class(held_out):
    zeros = held_out.images[held_out.labels == 0][:6]
    ones = held_out.images[held_out.labels == 1][:6]
    assert image_metrics.subject_similarity(zeros[:1], zeros[:1]) == pytest.approx(1.0, abs=1e-6)
    same = image_metrics.subject_similarity(zeros[:3], zeros[3:])
    other = image_metrics.subject_similarity(zeros[:3], ones[:3])
    assert same > other + 0.2


def test_mean_pairwise_cosine_matches_the_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    expected = np.mean([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x in a for y in b])
    assert image_metrics.mean_pairwise_cosine(a, b) == pytest.approx(expected)


def brute_force_f1(predicted: np.ndarray, target: np.ndarray, tolerance: float) -> float:
    """Independent edge F1: nearest-pixel distances by exhaustive search over coordinates."""
    p, t = np.argwhere(predicted), np.argwhere(target)
    distance = np.linalg.norm(p[:, None, :] - t[None, :, :], axis=-1)
    precision = (distance.min(axis=1) <= tolerance).mean()
    recall = (distance.min(axis=0) <= tolerance).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_edge_f1_known_answers_and_the_definition(held_out):
    edges = control.canny_edges(held_out.images[0])
    blank = np.zeros_like(edges)
    assert edges.sum() > 10
    assert image_metrics.edge_f1_pair(edges, edges) == 1.0
    assert image_metrics.edge_f1_pair(blank, edges) == 0.0 and image_metrics.edge_f1_pair(edges, blank) == 0.0
    assert image_metrics.edge_f1_pair(blank, blank) == 1.0
    shifted = np.roll(edges, 1, axis=1)
    assert image_metrics.edge_f1_pair(shifted, edges, tolerance=1.0) == pytest.approx(1.0)
    other = control.canny_edges(held_out.images[1])
    for tolerance in (0.0, 1.0, 2.0):
        got = image_metrics.edge_f1_pair(other, edges, tolerance)
        assert got == pytest.approx(brute_force_f1(other, edges, tolerance))
    assert image_metrics.edge_f1_pair(other, edges, 0.0) < 1.0
    with pytest.raises(ConfigError, match="differ in shape"):
        image_metrics.edge_f1_pair(edges, edges[:-1])


def test_ssim_and_control_fidelity(held_out):
    x = held_out.images[:3]
    assert image_metrics.ssim(x, x) == pytest.approx(1.0)
    assert image_metrics.ssim(x, 1 - x) < 0.5
    canny_maps = [control.canny(image) for image in x]
    result = image_metrics.control_fidelity(x, canny_maps, "canny")
    assert result.values == {"edge_f1": pytest.approx(1.0), "edge_ssim": pytest.approx(1.0)}
    blank = image_metrics.control_fidelity(np.zeros_like(x), canny_maps, "canny")
    assert blank.values["edge_f1"] == 0.0 and blank.values["edge_ssim"] < 1.0
    segmented = image_metrics.control_fidelity(x, [control.segmentation(image) for image in x], "segmentation")
    assert segmented.values["segmentation_ssim"] == pytest.approx(1.0, abs=1e-4)  # 8-bit PNG levels
    with pytest.raises(ConfigError, match="one control per output"):
        image_metrics.control_fidelity(x, canny_maps[:2], "canny")
    with pytest.raises(ConfigError, match="canny, landmarks, segmentation"):
        image_metrics.control_fidelity(x, canny_maps, "depth")


def test_missing_encoders_are_listed_as_skipped(tmp_path, held_out):
    images = glyphs.to_pil(held_out.images[:2])
    none = image_metrics.clip_scores(images, "a handwritten digit 0", images, encoder=None)
    assert none.values == {} and set(none.skipped) == {"clip_i", "clip_t"}
    assert "--eval-encoder" in none.skipped["clip_t"]
    missing = tmp_path / "no-such-model"
    result = image_metrics.clip_scores(images, "a digit", images, encoder=missing).update(
        image_metrics.dino_similarity(images, images, encoder=missing))
    assert result.values == {} and set(result.skipped) == {"clip_i", "clip_t", "dino"}
    assert all(str(missing) in reason for reason in result.skipped.values())
    assert ImageMetrics({"a": 1.0}, {"b": "why"}).as_dict() == {"a": 1.0, "skipped": {"b": "why"}}


def test_clip_and_dino_scores_with_tiny_random_encoders(tmp_path, held_out):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from peftlab.diffusion.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    text = {"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              clip_tokenizer())
    processor.save_pretrained(tmp_path / "clip")
    ViTModel(ViTConfig(**vision), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")

    images = glyphs.to_pil(held_out.images[:3])
    clip = image_metrics.clip_scores(images, ["a handwritten digit 1"] * 3, images, encoder=tmp_path / "clip")
    assert clip.skipped == {} and -1.0 <= clip.values["clip_t"] <= 1.0
    identical = image_metrics.clip_scores(images[:1], None, images[:1], encoder=tmp_path / "clip")
    assert identical.values == {"clip_i": pytest.approx(1.0, abs=1e-5)}
    dino = image_metrics.dino_similarity(images[:1], images[:1], encoder=tmp_path / "dino")
    assert dino.values == {"dino": pytest.approx(1.0, abs=1e-5)}
    assert image_metrics.dino_similarity(images[:1], images[1:], encoder=tmp_path / "dino").values["dino"] < 1.0 - 1e-4


def test_controls_from_a_target_image(held_out):
    image = glyphs.to_pil(held_out.images[:1])[0]
    edges = np.asarray(control.make_control(image, "canny").convert("L"))
    assert edges.shape == (32, 32) and set(np.unique(edges)) == {0, 255}
    assert (edges > 0).sum() == control.canny_edges(image).sum()
    levels = np.unique(np.asarray(control.segmentation(image).convert("L")))
    assert 2 <= len(levels) <= 3
    assert control.segmentation_map(np.zeros((8, 8))).max() == 0.0
    with pytest.raises(ConfigError, match="choose one of: canny, landmarks, segmentation"):
        control.make_control(image, "depth")


@pytest.mark.skipif(importlib.util.find_spec("dlib") is not None, reason="dlib installed: landmarks are computed")
def test_landmarks_without_dlib_name_the_install_line(held_out):
    with pytest.raises(UnsupportedError, match="pip install dlib-bin"):
        control.landmarks(held_out.images[0])
    result = image_metrics.control_fidelity(held_out.images[:1], held_out.images[:1], "landmarks")
    assert result.values == {} and "pip install" in result.skipped["landmark_error"]


@pytest.mark.skipif(importlib.util.find_spec("dlib") is None
                    or importlib.util.find_spec("face_recognition_models") is None,
                    reason="the optional landmarks extra (dlib-bin, face-recognition-models) is not installed")
def test_landmark_error_is_the_shift_of_the_face():
    from PIL import Image
    from skimage import data

    face = Image.fromarray(data.astronaut()).resize((256, 256))
    points = control.face_landmarks(face)
    assert points.shape == (68, 2)
    dots = np.asarray(control.landmarks(face).convert("L"))
    assert 60 <= (dots > 0).sum() <= 68  # 68 landmarks; a few may share a pixel
    same = image_metrics.control_fidelity([face], [face], "landmarks").values
    assert same == {"landmark_faces_found": 1.0, "landmark_error": 0.0}
    shifted = face.transform(face.size, Image.Transform.AFFINE, (1, 0, -5, 0, 1, 0))  # 5 px to the right
    error = image_metrics.control_fidelity([shifted], [face], "landmarks").values["landmark_error"]
    assert 4.0 < error < 6.0


def test_condition_encoder_starts_at_zero_and_can_learn(held_out):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    encoder = control.ConditionEncoder.for_unet(unet, downscale=4)
    hint = control.control_tensor([control.canny(image) for image in held_out.images[:2]])
    out = encoder(hint)
    assert hint.shape == (2, 3, 32, 32)
    assert out.shape == unet.conv_in(torch.randn(2, 4, 8, 8)).shape == (2, 32, 8, 8)
    assert torch.count_nonzero(out) == 0  # h0 = conv_in(z) + E(c) starts as the base UNet's h0
    (out * torch.randn_like(out)).sum().backward()
    assert encoder.zero_conv.weight.grad.abs().sum() > 0  # ... and the zero convolution receives a gradient
    with pytest.raises(ConfigError, match="power of two"):
        control.ConditionEncoder(32, downscale=3)
    with pytest.raises(ConfigError, match="not divisible"):
        encoder(torch.zeros(1, 3, 30, 30))
