"""Every method on a LLaVA-style vision-language model (``transformers.LlavaForConditionalGeneration``): a tiny
random config (CLIP vision tower + Llama text model), since no pretrained VLM installs offline.

Layers are picked per component (language model, vision tower, projector) with ``component_targets``; a
training step sends the gradient through the image into the vision tower's adapters; HydraLoRA routes every
token of the joint sequence, image tokens included."""

from __future__ import annotations

import pytest
import torch
from conftest import OTHER_MEMORY, assert_same_greedy

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import AdapterModel, TargetError, component_targets, get_adapter_model
from peftlab.inject import AdapterLayer
from peftlab.methods.base import ADAPTERS

METHOD_NAMES = sorted(ADAPTERS)
VOCAB, IMAGE_TOKEN, IMAGE_SIZE, PATCH = 128, 127, 16, 4
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # the projector's output: one token per patch (CLS dropped)
COMPONENTS = {
    "language_model": ["q_proj", "v_proj"],
    "vision_tower": ["q_proj", "v_proj", "fc1"],
    "multi_modal_projector": ["linear_1", "linear_2"],
}


def tiny_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, initializer_range=0.2)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    # vision_feature_layer=-1: LLaVA-1.5's -2 feeds the projector the second-to-last vision layer, so adapters on
    # the last vision layer would get no gradient.
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def make_batch(seed: int = 0) -> dict:
    """Two rows: BOS, the image's placeholder tokens (expanded, as the LLaVA processor does), then text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(2, VOCAB - 1, (2, 6), generator=g)
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, IMAGE_TOKENS), IMAGE_TOKEN), text], dim=1)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": labels}


def make_config(method: str):
    return ADAPTERS[method].config_class(r=2, target_modules=component_targets(COMPONENTS))


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def train(model: AdapterModel, batch: dict, steps: int = 8) -> list[float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=3e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss + model.extra_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(params=METHOD_NAMES)
def method(request):
    return request.param


def test_train_save_load_merge_and_generate(method, tmp_path):
    batch = make_batch()
    model = get_adapter_model(tiny_llava(), make_config(method))
    adapted = {name.split(".")[1] for name, _ in model._layers()}
    assert adapted == {"language_model", "vision_tower", "multi_modal_projector"}
    assert not any(n.endswith("k_proj") or n.endswith("fc2") for n, _ in model._layers())

    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." in n}
    losses = train(model, batch)
    assert losses[-1] < 0.9 * losses[0], losses
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    moved = {n.split(".")[2] for n, p in model.named_parameters() if n in start and not torch.equal(p, start[n])}
    assert moved == {"language_model", "vision_tower", "multi_modal_projector"}  # the image's gradient arrived

    model.eval()
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        loaded = AdapterModel.from_pretrained(tiny_llava(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        tolerance = OTHER_MEMORY if low_cpu_mem_usage else {"rtol": 0, "atol": 0}  # low: the file's own tensors
        torch.testing.assert_close(logits(loaded, batch), expected, **tolerance)

    options = next(layer.adapters["default"].example_merge_options() for _, layer in model._layers())
    if options:  # HydraLoRA merges a fixed mixture: with a zero router, ω is uniform for every token, as merged
        with torch.no_grad():
            for _, layer in model._layers():
                layer.adapters["default"].router.weight.zero_()
        expected = logits(model, batch)
    prompt = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
    reference = model.generate(**prompt, max_new_tokens=4, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
    generated = reference.sequences
    assert generated.shape == (2, batch["input_ids"].shape[1] + 4)
    model.merge(**options)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=5e-5)  # logits up to ~10
    plain = model.merge_and_unload(**options)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    # merged weights round differently (logits within 5e-5 above): the same tokens, but where a near tie decides
    assert_same_greedy(plain.generate(**prompt, max_new_tokens=4, do_sample=False), generated, reference.scores, 1e-4)


def test_hydralora_routes_every_token_of_the_joint_sequence():
    from peftlab import HydraLoraConfig

    config = HydraLoraConfig(r=2, num_heads=3, target_modules=component_targets(COMPONENTS))
    model = get_adapter_model(tiny_llava(), config)
    text_layer = model.base_model.get_submodule("model.language_model.layers.0.self_attn.q_proj").adapters["default"]
    vision_layer = model.base_model.get_submodule("model.vision_tower.encoder.layers.0.self_attn.q_proj")
    batch = make_batch()
    logits(model, batch)
    length = batch["input_ids"].shape[1]
    assert text_layer._weights.shape == (2, length, 3)  # one ω per token, image tokens included
    assert vision_layer.adapters["default"]._weights.shape == (2, IMAGE_TOKENS + 1, 3)  # patches + CLS
    first = text_layer._weights.clone()
    logits(model, {**batch, "pixel_values": torch.randn_like(batch["pixel_values"])})
    image = batch["input_ids"] == IMAGE_TOKEN
    # layer 0 sees each token's own embedding: another image changes ω on the image tokens only
    assert not torch.allclose(text_layer._weights[image], first[image])
    torch.testing.assert_close(text_layer._weights[~image], first[~image], rtol=0, atol=0)
    assert set(model.routing_stats()) == {n for n, _ in model._layers()}


def test_a_wrong_pattern_names_the_layers_and_the_full_names():
    from peftlab import LoraConfig

    expected = (r"must match a whole module name, such as .*model\.language_model\.layers\.0\.self_attn\.q_proj"
                r".*matched nothing.*can be adapted:.*q_proj.*linear_1")
    with pytest.raises(TargetError, match=expected):
        get_adapter_model(tiny_llava(), LoraConfig(target_modules="language_model.*q_proj"))  # not a whole name
    with pytest.raises(TargetError, match="pre_layrnorm, a LayerNorm, which peftlab cannot adapt"):
        get_adapter_model(tiny_llava(), LoraConfig(target_modules=".*vision_tower.*"))
    with pytest.raises(TargetError, match="matched nothing"):
        get_adapter_model(tiny_llava(), LoraConfig(target_modules=component_targets({"vision_model": ["q_proj"]})))
