"""MTLoRA: the four structures, both inits, fused projections, merge/save round trips.

Every comparison is against definitions written here with plain torch ops (W + s·B·T·A applied as a dense
layer), never against the adapter's own helpers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

from peftlab import AdapterLayer, AdapterModel, ConfigError, LoraConfig, MTLoraConfig, get_adapter_model
from peftlab.methods.mtlora import transformation

STRUCTURES = ["shim", "icfm", "ctcm", "dtsm"]
KINDS = ["linear", "conv1d", "conv2d", "embedding"]


class Holder(nn.Module):
    """One layer under a chosen name (``c_attn`` triggers GPT-2 fused-projection detection)."""

    def __init__(self, layer: nn.Module, name: str = "layer") -> None:
        super().__init__()
        self.name = name
        self.add_module(name, layer)

    def forward(self, x):
        return getattr(self, self.name)(x)


def make_layer(kind: str) -> tuple[Holder, torch.Tensor]:
    """A float64 layer and an input for it."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    if kind == "linear":
        holder, x = Holder(nn.Linear(10, 7)), torch.randn(3, 4, 10, generator=g)
    elif kind == "conv1d":
        holder, x = Holder(Conv1D(7, 10)), torch.randn(3, 4, 10, generator=g)
    elif kind.startswith("c_attn"):  # GPT-2-style fused q|k|v: d_out = 3·d_in
        holder, x = Holder(Conv1D(30, 10), name="c_attn"), torch.randn(3, 4, 10, generator=g)
    elif kind == "conv2d":
        conv = nn.Conv2d(3, 5, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))
        holder, x = Holder(conv), torch.randn(2, 3, 7, 6, generator=g)
    else:
        holder, x = Holder(nn.Embedding(12, 6)), torch.randint(0, 12, (3, 5), generator=g)
    with torch.no_grad():
        for p in holder.parameters():
            p.normal_(0, 0.3, generator=g)
    return holder.double(), x.double() if x.is_floating_point() else x


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Random values in every adapter tensor (so B ≠ 0 and T is generic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def reference_t(c: torch.Tensor, d: torch.Tensor | None, structure: str) -> torch.Tensor:
    """T written out element-wise with einsum, for one r × r block."""
    if structure == "shim":
        return c
    if structure == "icfm":
        return torch.einsum("ik,jk->ij", c, c)
    if structure == "ctcm":
        return torch.einsum("ik,kj->ij", c, d)
    return c + d


def reference_delta_w(adapter: nn.Module, structure: str, slices: int, per_slice: bool) -> torch.Tensor:
    """ΔW = s·B·T·A with block-diagonal B (and T per slice) on fused layers, flat (d_out, d_in)."""
    a, b, c, d = adapter.lora_A, adapter.lora_B, adapter.transform_C, adapter.transform_D
    if per_slice:
        t = torch.block_diag(*[reference_t(c[j], None if d is None else d[j], structure) for j in range(slices)])
    else:
        t = reference_t(c, d, structure)
    b = torch.block_diag(*b.chunk(slices, dim=0))
    return adapter.scaling * b @ t @ a


def dense_forward(layer: nn.Module, x: torch.Tensor, delta_w: torch.Tensor) -> torch.Tensor:
    """The layer with its weight replaced by W + ΔW (ΔW flat, (d_out, d_in)), in plain torch ops."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight + delta_w, layer.bias)
    if isinstance(layer, Conv1D):
        return x @ (layer.weight + delta_w.t()) + layer.bias
    if isinstance(layer, nn.Conv2d):
        w = layer.weight + delta_w.reshape(layer.weight.shape)
        return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation)
    return F.embedding(x, layer.weight + delta_w.t())


def wrap(holder: Holder, **kwargs) -> tuple[AdapterModel, nn.Module, nn.Module]:
    model = get_adapter_model(holder, MTLoraConfig(r=3, alpha=6, target_modules=[holder.name], **kwargs))
    wrapped = getattr(model.base_model, holder.name)
    return model, wrapped.adapters["default"], wrapped.base_layer


# -- the pure function --------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_transformation_matches_definition(structure):
    g = torch.Generator().manual_seed(0)
    c, d = torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64)  # batched over a leading dim too
    t = transformation(c, d, structure)
    for j in range(2):
        assert_close(t[j], reference_t(c[j], d[j], structure))


def test_icfm_transform_is_symmetric_psd():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 6, 6, generator=g)
    t = transformation(c, None, "icfm")
    assert_close(t, t.mT)
    assert torch.linalg.eigvalsh(t).min() >= -1e-5
    holder, _ = make_layer("linear")
    _, adapter, _ = wrap(holder, structure="icfm")
    t = adapter.transform()
    assert_close(t, t.t())
    assert torch.linalg.eigvalsh(t).min() >= -1e-10


def test_transformation_rejects_bad_input():
    c = torch.eye(3)
    with pytest.raises(ValueError, match="needs D"):
        transformation(c, None, "ctcm")
    with pytest.raises(ValueError, match="unknown MTLoRA structure"):
        transformation(c, c, "nope")


# -- forward = dense definition = merged layer ----------------------------------------------------------------
D_IN = {"linear": 10, "conv1d": 10, "c_attn": 10, "conv2d": 3 * 3 * 2, "embedding": 12}


def flat(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (d_out, d_in), written out per type."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return w.clone()
    if isinstance(layer, nn.Conv2d):
        return w.reshape(w.shape[0], -1).clone()
    return w.t().clone()  # Conv1D (in, out), Embedding (num, dim)


@pytest.mark.parametrize("kind", [*KINDS, "c_attn-dense", "c_attn-per_slice"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_forward_equals_dense_definition_and_merged(structure, kind):
    holder, x = make_layer(kind)
    fused = kind.split("-")[1] if kind.startswith("c_attn") else "dense"
    slices = 3 if kind.startswith("c_attn") else 1
    model, adapter, base = wrap(holder, structure=structure, fused=fused)
    randomize(model)
    assert adapter.lora_A.shape == (3 * slices, D_IN[kind.split("-")[0]])
    params = list(adapter.parameters())
    assert len(params) == (4 if structure in ("ctcm", "dtsm") else 3)
    weight = flat(base)
    floating = x.is_floating_point()
    if floating:
        x.requires_grad_(True)
    y_base = base(x).detach()
    w_out = torch.randn_like(y_base)

    def value_and_grads(fn):
        y = fn()
        return y.detach(), torch.autograd.grad((y * w_out).sum(), [*params, x] if floating else params)

    def delta_w():
        return reference_delta_w(adapter, structure, slices, fused == "per_slice")

    y, grads = value_and_grads(lambda: model(x))
    y_ref, grads_ref = value_and_grads(lambda: dense_forward(base, x, delta_w()))
    assert (y - y_base).abs().max() > 1e-3
    assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.abs().max() > 0
        assert_close(g, g_ref)

    # merged: W + ΔW in the layer itself, same values and input gradients; unmerge restores W
    expected = weight + delta_w().detach()
    model.merge()
    assert_close(flat(base), expected)
    y_merged = model(x)
    assert_close(y_merged.detach(), y)
    if floating:
        (gx,) = torch.autograd.grad((y_merged * w_out).sum(), x)
        assert_close(gx, grads[-1])
    model.unmerge()
    assert_close(flat(base), weight)


# -- initialisation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_identity_init_equals_lora_with_same_a_b(structure, kind):
    holder, x = make_layer(kind)
    lora_holder, _ = make_layer(kind)
    model, adapter, _ = wrap(holder, structure=structure, init="identity")
    assert torch.equal(adapter.transform(), torch.eye(3, dtype=torch.float64))
    with torch.no_grad():  # B ≠ 0 so the comparison sees the adapter path
        adapter.lora_B.normal_(generator=torch.Generator().manual_seed(5))
    lora = get_adapter_model(lora_holder, LoraConfig(r=3, alpha=6, target_modules=["layer"]))
    lora_adapter = lora.base_model.layer.adapters["default"]
    with torch.no_grad():
        lora_adapter.lora_A.copy_(adapter.lora_A)
        lora_adapter.lora_B.copy_(adapter.lora_B)
    y, y_lora = model(x), lora(x)
    assert (y - holder.layer.base_layer(x)).abs().max() > 1e-3
    assert torch.equal(y, y_lora)


@pytest.mark.parametrize("init", ["reference", "identity"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_init_values(structure, init):
    holder, x = make_layer("linear")
    model, adapter, base = wrap(holder, structure=structure, init=init)
    assert torch.equal(model(x), base(x))  # B = 0: ΔW = 0 at the start
    assert torch.count_nonzero(adapter.lora_B) == 0
    bound = 1 / 10**0.5  # Kaiming-uniform (a = √5): U(-1/√fan_in, 1/√fan_in)
    assert 0.5 * bound < adapter.lora_A.abs().max() <= bound
    c, d, eye = adapter.transform_C, adapter.transform_D, torch.eye(3, dtype=torch.float64)
    if init == "identity":
        assert torch.equal(c, eye)
        if d is not None:
            assert torch.equal(d, eye if structure == "ctcm" else torch.zeros_like(eye))
    else:
        for m in (c, d) if d is not None else (c,):
            assert 0.3 * 3**-0.5 < m.abs().max() <= 3**-0.5
            assert not torch.allclose(m, eye)


class TwoLayers(nn.Module):
    """A GPT-2-style fused q|k|v Conv1D (``c_attn``) followed by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(24, 8)
        self.proj = nn.Linear(24, 5)

    def forward(self, x):
        return self.proj(torch.tanh(self.c_attn(x)))


@pytest.mark.parametrize("fused", ["dense", "per_slice"])
@pytest.mark.parametrize("init", ["reference", "identity"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_two_steps_train_every_tensor(structure, init, fused):
    torch.manual_seed(0)
    config = MTLoraConfig(r=2, structure=structure, init=init, fused=fused, target_modules=["c_attn", "proj"])
    model = get_adapter_model(TwoLayers(), config)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(params) == 2 * (4 if structure in ("ctcm", "dtsm") else 3)
    assert model.base_model.c_attn.adapters["default"].lora_A.shape == (6, 8)  # k = 3 slices detected
    start = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 5, generator=g)
    changed = []
    for _ in range(2):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()
        changed.append({n for n, p in params.items() if not torch.equal(p, start[n])})
    # B = 0: at step 1 only B gets a gradient; A and T follow at step 2, and nothing stays dead
    assert changed[0] == {n for n in params if n.endswith("lora_B")}
    assert changed[1] == set(params)


# -- fused projections ------------------------------------------------------------------------------------------
def adapters_of(model: AdapterModel) -> dict[str, nn.Module]:
    return {n: m for n, m in model.base_model.named_modules() if n.endswith("adapters.default")}


@pytest.mark.parametrize(
    ("fused_slices", "k"), [(None, 3), ({"c_attn": 3}, 3), ({r".*\.c_attn": 3}, 3), (1, 1), ({"c_fc": 2}, 1)]
)
def test_fused_slices_detection(fused_slices, k):
    model = get_adapter_model(
        tiny_gpt2(), MTLoraConfig(r=4, fused="per_slice", fused_slices=fused_slices, target_modules=["c_attn", "c_fc"])
    )
    for name, adapter in adapters_of(model).items():
        slices = k if "c_attn" in name else (2 if fused_slices == {"c_fc": 2} else 1)
        assert adapter.lora_A.shape == (slices * 4, 32)
        assert adapter.lora_B.shape == ((96 if "c_attn" in name else 128), 4)
        assert adapter.transform_C.shape == ((slices, 4, 4) if slices > 1 else (4, 4))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_per_slice_equals_dense_with_block_diagonal_t(structure):
    per_slice = get_adapter_model(
        tiny_gpt2(), MTLoraConfig(r=3, structure=structure, fused="per_slice", target_modules=["c_attn"])
    )
    dense = get_adapter_model(tiny_gpt2(), MTLoraConfig(r=3, structure=structure, target_modules=["c_attn"]))
    randomize(per_slice)
    with torch.no_grad():
        for (_, a), (_, b) in zip(adapters_of(per_slice).items(), adapters_of(dense).items(), strict=True):
            assert b.transform_C.shape == (9, 9)
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B)
            b.transform_C.copy_(torch.block_diag(*a.transform_C))
            if a.transform_D is not None:
                b.transform_D.copy_(torch.block_diag(*a.transform_D))
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    y = per_slice(ids).logits
    with per_slice.disable_adapter():
        assert (y - per_slice(ids).logits).abs().max() > 1e-4
    assert_close(y, dense(ids).logits)


@pytest.mark.parametrize("fused", ["dense", "per_slice"])
def test_fused_slices_mix_only_with_dense_t(fused):
    """Moving the r-block of A for slice 0 (q) changes k and v only when T is one dense matrix."""
    holder, x = make_layer("c_attn")
    model, adapter, _ = wrap(holder, structure="ctcm", fused=fused)
    randomize(model)
    view = holder.c_attn.view
    before = adapter.delta(x, view).detach()
    with torch.no_grad():
        adapter.lora_A[:3] += 1.0
    moved = (adapter.delta(x, view).detach() - before).abs().amax(dim=(0, 1)).view(3, 10).amax(dim=1)
    assert moved[0] > 1e-3
    if fused == "per_slice":
        assert torch.equal(moved[1:], torch.zeros(2, dtype=moved.dtype))
    else:
        assert (moved[1:] > 1e-3).all()


# -- round trips ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("structure", "fused", "targets"),
    [("ctcm", "per_slice", ["c_attn", "c_fc"]), ("icfm", "dense", ["c_attn", "c_proj"]), ("dtsm", "dense", None)],
)
def test_save_load_and_merge_round_trip(tmp_path, bert, token_batch, structure, fused, targets):
    if targets is None:  # BERT with the paper's GLUE targets: query, value, FFN in, FFN out
        base, fresh, batch = bert, None, token_batch
        targets = ["query", "value", "intermediate.dense", "output.dense"]
    else:
        base, fresh, batch = tiny_gpt2(), tiny_gpt2(), {"input_ids": token_batch["input_ids"]}
    config = MTLoraConfig(r=2, alpha=4, structure=structure, fused=fused, target_modules=targets)
    model = get_adapter_model(base, config)
    randomize(model)
    with torch.no_grad():
        y = model(**batch).logits
        with model.disable_adapter():
            y_base = model(**batch).logits
    assert (y - y_base).abs().max() > 1e-3
    original = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}

    model.save_pretrained(tmp_path)
    if fresh is None:
        from conftest import tiny_bert

        fresh = tiny_bert()
    loaded = AdapterModel.from_pretrained(fresh, tmp_path)
    assert loaded.peft_config["default"] == config
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, y)

    model.merge()
    with torch.no_grad():
        assert_close(model(**batch).logits, y, rtol=1e-4, atol=1e-5)
    model.unmerge()
    for n, p in model.named_parameters():
        if n in original:
            assert_close(p.detach(), original[n], rtol=0, atol=1e-6)
    with torch.no_grad():
        assert_close(model(**batch).logits, y, rtol=1e-5, atol=1e-6)
        plain = loaded.merge_and_unload()
        assert_close(plain(**batch).logits, y, rtol=1e-4, atol=1e-5)


# -- dropout ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_dropout_only_in_training_and_on_float_inputs(kind):
    holder, x = make_layer(kind)
    model, adapter, base = wrap(holder, structure="icfm", dropout=0.5)
    randomize(model)
    model.eval()
    y_eval = model(x)
    assert_close(y_eval, dense_forward(base, x, reference_delta_w(adapter, "icfm", 1, False)))
    model.train()
    torch.manual_seed(0)
    y_train = model(x)
    if kind == "embedding":  # token ids are never dropped
        assert torch.equal(y_train, y_eval)
    else:
        assert (y_train - y_eval).abs().max() > 1e-3


# -- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"structure": "dense"}, "structure='dense' is not an MTLoRA structure"),
        ({"init": "zeros"}, "init='zeros'"),
        ({"fused": "sparse"}, "fused='sparse'"),
        ({"fused_slices": 0}, "fused_slices must be a positive integer"),
        ({"fused_slices": True}, "fused_slices must be a positive integer"),
        ({"fused_slices": 1.5}, "fused_slices must be a positive integer"),
        ({"fused_slices": {"c_attn": -3}}, r"fused_slices\['c_attn'\] must be a positive integer"),
        ({"fused_slices": {"": 3}}, "fused_slices keys"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"r": 0}, "r must be a positive integer"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MTLoraConfig(**kwargs)


def test_config_json_round_trip():
    config = MTLoraConfig(r=4, structure="dtsm", init="identity", fused="per_slice", fused_slices={"c_attn": 3})
    assert MTLoraConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["method"] == "mtlora"


@pytest.mark.parametrize(("kind", "fused_slices"), [("linear", 3), ("conv2d", 5)])
def test_fused_slices_that_do_not_fit_the_layer(kind, fused_slices):
    holder, _ = make_layer(kind)
    with pytest.raises(ValueError, match=f"fused_slices={fused_slices} needs a Linear or Conv1D"):
        wrap(holder, fused_slices=fused_slices)
    assert not any(isinstance(m, AdapterLayer) for m in holder.modules())  # checked before anything is wrapped


def test_rank_larger_than_input_width_is_rejected():
    holder, _ = make_layer("linear")
    with pytest.raises(ValueError, match="r=11 exceeds"):
        get_adapter_model(holder, MTLoraConfig(r=11, target_modules=["layer"]))
