"""Gradient checkpointing of adapted models: the adapter gradients are those of a run without checkpointing,
for every method, with ``use_reentrant`` True and False, on a text model (tiny Llama), a vision model (tiny
ViT, whose input is ``pixel_values``) and a diffusers UNet (whose input is a latent ``sample``).

Checkpointing recomputes the same forward in backward, so the gradients agree to float rounding (``RTOL``, ``ATOL``;
the recomputed forward runs the same ops in the same order, the backward may sum in another order).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import get_adapter_model
from peftlab.errors import PeftlabError
from peftlab.methods.base import ADAPTERS

METHOD_NAMES = sorted(ADAPTERS)
RTOL, ATOL = 1e-5, 1e-7


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    return LlamaForCausalLM(config), ["q_proj", "v_proj"], None, lambda m: m(input_ids=ids, labels=ids).loss


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=3)
    g = torch.Generator().manual_seed(1)
    pixels, labels = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0, 2])
    # a trainable head: without one, reentrant checkpointing used to give the adapters no gradient silently
    return (ViTForImageClassification(config), ["q_proj", "v_proj"], ["classifier"],
            lambda m: m(pixel_values=pixels, labels=labels).loss)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    g = torch.Generator().manual_seed(1)
    sample, text, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(
        2, 4, 8, 8, generator=g)

    def loss(m):
        return torch.nn.functional.mse_loss(m(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample,
                                            target)

    return unet, ["to_q", "to_v", "conv1"], None, loss


MODELS = {"llama": tiny_llama, "vit": tiny_vit, "unet": tiny_unet}


def adapted(kind: str, method: str, **options):
    torch.manual_seed(0)
    model, targets, heads, loss = MODELS[kind]()
    if "conv2d" not in ADAPTERS[method].supported_kinds:
        targets = [t for t in targets if t != "conv1"]  # the UNet's resnet convolutions
    config = ADAPTERS[method].config_class(r=2, target_modules=targets, modules_to_save=heads, **options)
    wrapped = get_adapter_model(model, config).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial adapters (B = 0 at init would make A's gradient 0)
        for _, layer in wrapped._layers():
            for p in layer.adapters["default"].parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return wrapped, loss


def adapter_gradients(model, loss) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        value = loss(model) + model.extra_loss()
    value.backward()
    grads = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for name, p in model.named_parameters() if p.requires_grad and ".adapters." in name}
    return value.item(), grads


def balance(method: str) -> dict:
    return {"balance_loss_weight": 0.1} if method == "hydralora" else {}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_adapter_gradients_are_those_without_checkpointing(kind, method, reentrant):
    model, loss = adapted(kind, method, **({} if reentrant else balance(method)))
    expected_loss, expected = adapter_gradients(model, loss)
    assert expected and all(g.abs().sum() > 0 for g in expected.values())
    if reentrant:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    else:  # as HF Trainer(activation_checkpointing=True) calls it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False)
    value, grads = adapter_gradients(model, loss)
    assert value == pytest.approx(expected_loss, rel=RTOL)  # the balance loss counted once, as without checkpointing
    assert grads.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=RTOL, atol=ATOL, msg=name)
    model.gradient_checkpointing_disable()
    assert adapter_gradients(model, loss)[0] == pytest.approx(expected_loss, rel=RTOL)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointing_really_recomputes(kind, reentrant):
    """The checkpointed runs above do checkpoint: every adapted layer runs twice per step (forward, recompute)."""
    model, loss = adapted(kind, "lora")
    calls: dict[str, int] = {}
    for name, layer in model._layers():
        layer.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    adapter_gradients(model, loss)
    assert set(calls.values()) == {1}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    adapter_gradients(model, loss)
    once = {"mid_block.resnets.0.conv1"} if kind == "unet" else set()  # diffusers runs that resnet unchecked
    assert {n for n, c in calls.items() if c != 3} == once and all(calls[n] == 2 for n in once), calls


def test_hydralora_balance_loss_refuses_reentrant_checkpointing():
    model, _ = adapted("llama", "hydralora", balance_loss_weight=0.1)
    with pytest.raises(PeftlabError, match=r"balance loss.*use_reentrant': False"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
