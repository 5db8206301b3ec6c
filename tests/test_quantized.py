"""Adapters on a quantized base (QLoRA-style): a tiny random Llama loaded with transformers'
``BitsAndBytesConfig`` (bitsandbytes' CPU backend), 4-bit NF4 and 8-bit int8, for every registered method.

The reference for every number is the same adapter on the *dequantized* fp32 base (each quantized linear
replaced by an ``nn.Linear`` holding ``dequantize(W)``): on CPU the quantized layers compute with exactly that
weight, so the adapter math must agree to float rounding (``ATOL``). Merging requantizes, and is checked
against the rounding bound the warning states.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import AdapterModel, get_adapter_model
from peftlab.layers import LayerView
from peftlab.methods.base import ADAPTERS

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pinned in requirements.txt)")

METHOD_NAMES = sorted(ADAPTERS)
TARGETS = ["q_proj", "v_proj", "down_proj"]
ATOL = 1e-5  # fp32 rounding of the same math in a different order; the quantization error of W is ~1e-2
EVAL_ATOL = 0.02  # int8 eval error here ≈ 0.006 on logits of size ~1; the adapters move them by 0.17 … 1
INPUT = torch.tensor([[3, 17, 5, 42, 8, 1, 60, 33, 12, 7], [9, 2, 44, 21, 6, 30, 11, 50, 4, 19]])


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder, bits: int | None) -> nn.Module:
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quantization_config = None
    if bits == 4:
        quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float32)
    elif bits == 8:
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization_config, device_map="cpu",
                                                dtype=torch.float32).eval()


def bnb_weight(module: nn.Module) -> torch.Tensor | None:
    """The dequantized weight of a bitsandbytes layer, straight from bitsandbytes (``None`` for other modules)."""
    w = module.weight if isinstance(module, nn.Linear) else None
    if type(w).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    if type(w).__name__ == "Int8Params":
        return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB if w.SCB is not None else module.state.SCB)
    return None


def dequantized(folder, quantized: nn.Module) -> nn.Module:
    """The fp32 model whose linear layers hold the quantized model's dequantized weights."""
    model = load(folder, None)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if (weight := bnb_weight(module)) is not None:
                model.get_submodule(name.replace(".base_layer", "")).weight.copy_(weight)
    return model


def make_config(method: str, **kwargs):
    options = {"init_weights": False} if "init_weights" in ADAPTERS[method].config_class.__dataclass_fields__ else {}
    return ADAPTERS[method].config_class(r=4, target_modules=TARGETS, **{**options, **kwargs})


def perturb(model: AdapterModel, scale: float = 0.3) -> None:
    """Every adapter parameter moved by a seeded random amount (large enough to see the adapter in a merge)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in model._layers():
            for p in layer.adapters["default"].parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def logits(model: nn.Module) -> torch.Tensor:
    """The logits in training mode (no dropout in this Llama): there bitsandbytes' CPU layers compute with the
    dequantized weight, on any x86-64 CPU; in eval mode the int8 layer also rounds its input to int8 (LLM.int8())
    and a 4-bit layer may repack its weight for AVX512-BF16 kernels."""
    model.train()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=INPUT).logits


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.fixture(params=METHOD_NAMES)
def method(request):
    return request.param


@pytest.fixture(params=[4, 8], ids=["nf4", "int8"])
def bits(request):
    return request.param


def test_bitsandbytes_runs_on_this_cpu():
    layer = bnb.nn.Linear4bit(64, 8, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    view = LayerView(layer, "layer")
    assert tuple(layer.weight.shape) == (256, 1)  # packed: the shape says nothing about the layer
    assert (view.quantized, view.d_out, view.d_in) == ("nf4", 8, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ view.flat_weight().t(), atol=ATOL, rtol=0)


def test_output_equals_the_adapter_on_the_dequantized_base(saved_llama, method, bits):
    quantized = quiet(get_adapter_model, load(saved_llama, bits), make_config(method))
    perturb(quantized)
    reference = get_adapter_model(dequantized(saved_llama, quantized.base_model), make_config(method))
    reference.set_adapter_state_dict(quantized.adapter_state_dict("default"))
    with quantized.disable_adapter():
        base = logits(quantized)
    adapted = logits(quantized)
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(adapted, logits(reference), atol=ATOL, rtol=0)
    with warnings.catch_warnings():  # with autograd (HRA's training paths)
        warnings.simplefilter("ignore")
        torch.testing.assert_close(quantized(input_ids=INPUT).logits.detach(),
                                   reference(input_ids=INPUT).logits.detach(), atol=ATOL, rtol=0)


def test_eval_forward_over_more_tokens_than_outputs(saved_llama, method, bits):
    """Inference over more tokens than a layer has outputs (where HRA would pick its weight path on a float
    layer) runs the quantized layers with their own weight. bitsandbytes' eval forward is approximate (LLM.int8()
    rounds the activations to int8; a 4-bit layer may compute in bf16 on AVX512-BF16 CPUs): ``EVAL_ATOL``."""
    ids = torch.arange(80).remainder(64).reshape(1, 80)  # 80 tokens > d_out = 64
    quantized = quiet(get_adapter_model, load(saved_llama, bits), make_config(method))
    perturb(quantized)
    reference = get_adapter_model(dequantized(saved_llama, quantized.base_model), make_config(method)).eval()
    reference.set_adapter_state_dict(quantized.adapter_state_dict("default"))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(quantized.eval()(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   atol=EVAL_ATOL, rtol=0)


def test_trains_on_a_quantized_base(saved_llama, method, bits):
    torch.manual_seed(0)
    model = quiet(get_adapter_model, load(saved_llama, bits), make_config(method)).train()
    perturb(model, 0.05)  # MTLoRA starts with B = 0, where A's first gradient is 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(input_ids=INPUT, labels=INPUT).loss + model.extra_loss()
        loss.backward()
        if step == 0:
            for name, layer in model._layers():
                for pname, p in layer.adapters["default"].named_parameters():
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def rounding_bound(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |requantized(W) − W|: half the widest gap between two quantisation levels, times the
    absmax of the entry's block (4-bit: blocks of 64 in row-major order) or row (int8)."""
    if kind == "int8":  # bitsandbytes quantizes an fp16 copy: add its rounding, 2⁻¹¹ relative
        return weight.abs().amax(1, keepdim=True).expand_as(weight) / 254 * (1 + 2**-11) + weight.abs() * 2**-11
    levels = bnb.functional.get_4bit_type(kind, device="cpu").sort().values
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    blocks = weight.reshape(-1, 64).abs().amax(1, keepdim=True)
    return (half_gap * blocks).expand(-1, 64).reshape(weight.shape)


def test_merge_requantizes_within_the_stated_rounding(saved_llama, method, bits):
    model = quiet(get_adapter_model, load(saved_llama, bits), make_config(method))
    perturb(model)
    options = next(layer.adapters["default"] for _, layer in model._layers()).example_merge_options()
    exact = {name: layer.adapters["default"].merged_weight(bnb_weight(layer.base_layer), **options)
             for name, layer in model._layers()}
    reference = get_adapter_model(dequantized(saved_llama, model.base_model), make_config(method))
    reference.set_adapter_state_dict(model.adapter_state_dict("default"))
    reference.merge(**options)  # exact: fp32 weights (HydraLoRA: a fixed head mixture, not the routed forward)
    with model.disable_adapter():
        base = logits(model)
    with pytest.warns(UserWarning, match=r"dequantized, merged and requantized.*moves each weight entry by up to"):
        model.merge(**options)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    for name, layer in model._layers():
        kind, view = layer.view.quantized, layer.view
        assert kind == ("nf4" if bits == 4 else "int8")
        error = (bnb_weight(layer.base_layer) - exact[name]).abs()
        bound = rounding_bound(kind, exact[name]) * 1.01 + 1e-6  # 1 %: the absmax is itself stored rounded
        assert (error <= bound).all(), f"{name}: max excess {(error - bound).max()}"
        # so the layer's merged output is within |x|·boundᵀ of the unmerged one
        xi = x[:, : view.d_in]
        layer.train()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y_merged = layer(xi)
        y_exact = xi @ exact[name].t()
        assert ((y_merged - y_exact).abs() <= xi.abs() @ bound.t() + 1e-5).all()
    merged = logits(model)
    exact_merged = logits(reference)
    assert (merged - exact_merged).norm() < 0.5 * (base - exact_merged).norm()  # the adapter was not dropped
    with pytest.warns(UserWarning, match="dequantized, unmerged and requantized"):
        model.unmerge()
    assert model.merged_adapters == []


@pytest.mark.parametrize("direction", ["quantized→fp32", "fp32→quantized"])
def test_adapter_moves_between_quantized_and_full_precision_bases(saved_llama, method, bits, direction, tmp_path):
    source_bits, target_bits = (bits, None) if direction == "quantized→fp32" else (None, bits)
    source = quiet(get_adapter_model, load(saved_llama, source_bits), make_config(method))
    perturb(source)
    source.save_pretrained(tmp_path)
    target = quiet(AdapterModel.from_pretrained, load(saved_llama, target_bits), tmp_path)
    saved = source.adapter_state_dict("default")
    loaded = target.adapter_state_dict("default")
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    # the loaded adapter runs on its new base like a fresh adapter given the same tensors
    fresh = quiet(get_adapter_model, load(saved_llama, target_bits), make_config(method))
    fresh.set_adapter_state_dict(saved)
    torch.testing.assert_close(logits(target), logits(fresh), atol=ATOL, rtol=0)


def test_a_quantized_tensor_subclass_that_cannot_be_read_is_a_clear_error():
    from peftlab.errors import PeftlabError
    from peftlab.layers import dequantized_weight

    class Opaque(torch.Tensor):  # stands in for a torchao subclass without a usable dequantize()
        def dequantize(self):
            raise NotImplementedError

    Opaque.__module__ = "torchao.dtypes.opaque"

    layer = nn.Linear(8, 4)
    layer.weight = nn.Parameter(layer.weight.detach().as_subclass(Opaque), requires_grad=False)
    assert LayerView(layer).quantized == "subclass"
    with pytest.raises(PeftlabError, match="tensor subclass peftlab cannot read"):
        dequantized_weight(layer, "subclass")


def test_adapters_go_on_a_base_on_the_meta_device(saved_llama):
    """A base built without data (``torch.device("meta")``): the finite-weight check has no values to read."""
    from transformers import AutoConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(saved_llama))
    wrapped = get_adapter_model(model, make_config("lora"), low_cpu_mem_usage=True)
    assert all(p.is_meta for p in wrapped.adapter_parameters("default").values())


def test_merging_into_a_torchao_weight_is_refused():
    from peftlab.errors import MergeError

    class FakeAffineQuantized(torch.Tensor):  # a torchao weight: readable (dequantize), not writable by peftlab
        def dequantize(self):
            return self.as_subclass(torch.Tensor)

    FakeAffineQuantized.__module__ = "torchao.dtypes.fake"
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 4))
    base[0].weight = nn.Parameter(base[0].weight.detach().as_subclass(FakeAffineQuantized), requires_grad=False)
    model = get_adapter_model(base, ADAPTERS["lora"].config_class(r=2, target_modules=["0"], init_weights=False))
    x = torch.randn(3, 8)
    before = model(x).detach()
    with pytest.raises(MergeError, match="merge on the full-precision base"):
        model.merge()
    assert model.merged_adapters == []
    torch.testing.assert_close(model(x).detach(), before, atol=0, rtol=0)
