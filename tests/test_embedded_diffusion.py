"""The embedded text-to-image model: a tiny pretraining run gives a loadable diffusers pipeline (the full run is
``python benchmarks/tiny_digits.py``, not a test)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from peftlab.data import glyphs
from peftlab.diffusion import embedded
from peftlab.errors import ConfigError

TINY = embedded.PretrainConfig(vae_steps=2, unet_steps=3, batch_size=4, max_images=12, letters="AB", per_letter=2)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    embedded.ensure_pretrained(root, config=TINY)
    return root


def test_pretrained_folder_is_a_standard_diffusers_pipeline(cache_root):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    folder = embedded.model_dir(cache_root)
    report = json.loads((folder / embedded.REPORT_NAME).read_text())
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.tokenizer.model_max_length == 77 and pipe.text_encoder.config.vocab_size == 49408
    assert pipe.tokenizer("a printed letter A").input_ids[0] == 49406  # CLIP's <|startoftext|>
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and not pipe.scheduler.config.clip_sample
    assert pipe.vae.config.scaling_factor == pytest.approx(report["scaling_factor"]) and report["scaling_factor"] > 0
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    assert report["images"] == 12 and report["parameters"]["unet"] == sum(p.numel() for p in pipe.unet.parameters())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a handwritten digit 3", "a printed letter A"], num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, glyphs.IMAGE_SIZE, glyphs.IMAGE_SIZE, 3) and np.isfinite(out).all()


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{part}.{k}": v for part in ("unet", "text_encoder", "vae")
            for k, v in load_file(next((folder / part).glob("*.safetensors"))).items()}


def test_ensure_pretrained_caches_force_rebuilds_and_the_seed_fixes_the_weights(cache_root):
    path = embedded.model_dir(cache_root)
    assert path == cache_root / "models" / f"{embedded.EMBEDDED_MODEL}-v{embedded.MODEL_VERSION}"
    stamp, before = (path / "model_index.json").stat().st_mtime_ns, _weights(path)
    assert embedded.ensure_pretrained(cache_root, config=TINY) == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp  # reused, not pretrained again
    assert embedded.ensure_pretrained(cache_root, force=True, config=TINY) == path
    assert (path / "model_index.json").stat().st_mtime_ns != stamp
    after = _weights(path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # deterministic
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == [], leftovers  # the temporary and old folders are gone


def test_training_images_and_captions():
    data = embedded.training_images(embedded.PretrainConfig(per_letter=2))
    assert len(data) == 1797 + 2 * len(embedded.PRETRAIN_LETTERS)
    assert data.images.shape[1:] == (32, 32) and 0 <= data.images.min() and data.images.max() <= 1
    assert set(data.captions()) == {glyphs.caption(k) for k in range(10)} | {
        f"a printed letter {c}" for c in embedded.PRETRAIN_LETTERS}
    assert glyphs.caption(3) == "a handwritten digit 3" and glyphs.caption("Q") == "a printed letter Q"
    assert not set(embedded.PRETRAIN_LETTERS) & set("QXZ")  # unseen concepts stay available for fine-tuning


def test_min_snr_weights_match_the_definition():
    abar = torch.tensor([0.99, 0.5, 0.01])
    weights = embedded.min_snr_weights(abar, torch.tensor([0, 1, 2]), gamma=5.0)
    snr = [0.99 / 0.01, 1.0, 0.01 / 0.99]
    assert torch.allclose(weights, torch.tensor([min(s, 5.0) / s for s in snr]))


@pytest.mark.parametrize("field, value", [("unet_steps", -1), ("batch_size", 0), ("caption_dropout", 1.0),
                                          ("max_images", 0)])
def test_bad_pretrain_config_is_one_clear_error(field, value):
    with pytest.raises(ConfigError, match=field):
        embedded.PretrainConfig(**{field: value}).validate()


def test_glyph_inputs_are_checked():
    with pytest.raises(ConfigError, match="unknown glyph class 'a'"):
        glyphs.caption("a")
    with pytest.raises(ConfigError, match="upper-case"):
        glyphs.letter_images("ab", per_letter=1)
    with pytest.raises(ConfigError, match="differ in size"):
        glyphs.to_array([np.zeros((8, 8)), np.zeros((9, 9))], None)
    resized = glyphs.to_array([np.zeros((8, 8)), np.ones((64, 64, 3))])
    assert resized.shape == (2, 32, 32) and resized[1].min() == pytest.approx(1.0)



def test_a_normalised_batch_passes_through_to_array_unchanged():
    """The image recipes normalise their samples once; every metric then takes that array as it is."""
    rng = np.random.default_rng(0)
    pictures = glyphs.to_pil(rng.random((3, 16, 16)).astype(np.float32))
    grey = glyphs.to_array(pictures, None)
    assert grey.dtype == np.float32 and grey.shape == (3, 16, 16)
    assert glyphs.to_array(grey, None) is grey and glyphs.to_array(grey, 16) is grey  # no second pass, no copy
    np.testing.assert_array_equal(glyphs.to_array(grey[0], None), grey[:1])
    np.testing.assert_array_equal(glyphs.to_array(list(grey), None), grey)  # the slow path gives the same
    assert glyphs.to_array(grey).shape == (3, 32, 32)  # another size is still resized
    assert glyphs.to_array(grey.astype(np.float64), None) is not grey
