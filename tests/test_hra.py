"""HRA against independent definitions: explicit reflection products and HF PEFT's HRA."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert
from torch import nn

from peftlab import HRAConfig, LoraConfig, get_adapter_model
from peftlab.methods.hra import (
    apply_reflections,
    householder_wy,
    lowrank_factors,
    normalized_columns,
    orthogonality_penalty,
    orthonormal_columns,
    reflect_weight,
    wy_factors,
)


def dense_h(u: torch.Tensor) -> torch.Tensor:
    """H = Π (I − 2 ûᵢ ûᵢᵀ), built as the paper defines it."""
    d = u.shape[0]
    h = torch.eye(d, dtype=u.dtype)
    for i in range(u.shape[1]):
        ui = u[:, i] / u[:, i].norm()
        h = h @ (torch.eye(d, dtype=u.dtype) - 2 * torch.outer(ui, ui))
    return h


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hra_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if "hra_u" in n]


@pytest.mark.parametrize("r", [1, 2, 7, 16, 64])
def test_wy_form_equals_explicit_product(r):
    torch.manual_seed(r)
    u = torch.randn(96, r, dtype=torch.float64)
    v = normalized_columns(u)
    t = householder_wy(v)
    wy = torch.eye(96, dtype=torch.float64) - v @ t @ v.T
    assert torch.allclose(wy, dense_h(u), atol=1e-12)
    x, w = torch.randn(5, 96, dtype=torch.float64), torch.randn(40, 96, dtype=torch.float64)
    assert torch.allclose(apply_reflections(x, v, t), x @ dense_h(u).T, atol=1e-12)
    assert torch.allclose(reflect_weight(w, v, t), w @ dense_h(u), atol=1e-12)
    assert torch.allclose(reflect_weight(reflect_weight(w, v, t), v, t.T), w, atol=1e-12)  # H⁻¹ = Hᵀ


def test_wy_factors_match_the_definition_values_and_gradients():
    torch.manual_seed(3)
    u = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    vt, t = wy_factors(u)
    v = normalized_columns(u)
    assert torch.allclose(vt, v.T, atol=1e-12) and torch.allclose(t, householder_wy(v), atol=1e-12)
    assert torch.allclose(torch.eye(20, dtype=u.dtype) - vt.T @ t @ vt, dense_h(u.detach()), atol=1e-12)
    assert torch.autograd.gradcheck(wy_factors, (u,))  # the hand-written backward, numerically
    g_vt, g_t = torch.randn_like(vt), torch.randn_like(t)  # and against autograd through the plain formulas
    (g1,) = torch.autograd.grad((vt * g_vt).sum() + (t * g_t).sum(), u)
    (g2,) = torch.autograd.grad((v.T * g_vt).sum() + (householder_wy(v) * g_t).sum(), u)
    assert torch.allclose(g1, g2, atol=1e-10)


@pytest.mark.parametrize("transposed", [False, True])  # Conv1D's flat weight is a transposed view
def test_lowrank_factors_give_x_times_wh(transposed):
    torch.manual_seed(4)
    u = torch.randn(20, 6, dtype=torch.float64)
    w = torch.randn(20, 12, dtype=torch.float64).t() if transposed else torch.randn(12, 20, dtype=torch.float64)
    a, b = lowrank_factors(*wy_factors(u), w)
    x = torch.randn(9, 20, dtype=torch.float64)
    assert torch.allclose(x @ w.T + (x @ a.T) @ b.T, x @ (w @ dense_h(u)).T, atol=1e-12)


def _peft_pair(model: nn.Module, targets: list[str], r: int = 4, **kw):
    ours = get_adapter_model(copy.deepcopy(model), HRAConfig(r=r, target_modules=targets, init_weights=False, **kw))
    theirs = peft.get_peft_model(
        copy.deepcopy(model), peft.HRAConfig(r=r, target_modules=targets, init_weights=False, **kw)
    )
    ours_u = dict((n.replace(".adapters.default", ""), p) for n, p in ours.named_parameters() if "hra_u" in n)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "hra_u" in n:
                key = n.replace("base_model.model.", "base_model.").replace(".hra_u.default", ".hra_u")
                p.copy_(ours_u[key])
    return ours, theirs


@pytest.mark.parametrize("path", ["activation", "weight", "lowrank"])
def test_linear_matches_peft_values_and_gradients(path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16))
    ours, theirs = _peft_pair(model, ["0"], r=6)
    ours.base_model[0].adapters["default"].forward_path = path
    x = torch.randn(7, 24, requires_grad=True)
    a, b = ours(x), theirs(x)
    assert rel_err(a, b) <= 1e-5
    ga = torch.autograd.grad(a.square().sum(), [x, *hra_params(ours)])
    gb = torch.autograd.grad(b.square().sum(), [x, *hra_params(theirs)])
    for g1, g2 in zip(ga, gb, strict=True):
        assert rel_err(g1, g2) <= 1e-5


def test_square_conv2d_matches_peft():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    ours, theirs = _peft_pair(model, ["0"], r=4)
    x = torch.randn(2, 3, 9, 9)
    a, b = ours(x), theirs(x)
    assert rel_err(a, b) <= 1e-5
    (ga,) = torch.autograd.grad(a.square().sum(), hra_params(ours))
    (gb,) = torch.autograd.grad(b.square().sum(), hra_params(theirs))
    assert rel_err(ga, gb) <= 1e-5


def test_bert_matches_peft(token_batch):
    model = tiny_bert()
    ours, theirs = _peft_pair(model, ["query", "key", "value", "dense"], r=8)
    a, b = ours(**token_batch).logits, theirs(**token_batch).logits
    assert rel_err(a, b) <= 1e-5
    ga = torch.autograd.grad(a.square().sum(), hra_params(ours))
    gb = torch.autograd.grad(b.square().sum(), hra_params(theirs))
    assert len(ga) == len(gb) == 2 * 6 + 1  # q, k, v, attn-out, ffn-in, ffn-out per layer + pooler
    for g1, g2 in zip(ga, gb, strict=True):
        assert rel_err(g1, g2) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_all_forward_paths_agree(kind):
    from transformers.pytorch_utils import Conv1D

    results = []
    for path in ("activation", "weight", "lowrank"):
        torch.manual_seed(1)
        layer = nn.Linear(20, 12) if kind == "linear" else Conv1D(12, 20)
        m = get_adapter_model(nn.Sequential(layer), HRAConfig(r=5, target_modules=["0"], init_weights=False))
        m.base_model[0].adapters["default"].forward_path = path
        x = torch.randn(30, 20, requires_grad=True)
        y = m(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), [x, *hra_params(m)])))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_auto_path_choice():
    m = get_adapter_model(nn.Sequential(nn.Linear(20, 4)), HRAConfig(r=4, target_modules=["0"]))
    layer = m.base_model[0]
    adapter, x = layer.adapters["default"], torch.randn(64, 20)
    assert adapter.multiplicative_path(x, layer.view) == "lowrank"  # training, 64 tokens > 2r
    assert adapter.multiplicative_path(x[:8], layer.view) == "activation"  # training, few tokens
    assert adapter.multiplicative_path(x.requires_grad_(), layer.view) == "activation"  # ḡ·W is computed anyway
    x = x.detach()
    with torch.no_grad():
        assert adapter.multiplicative_path(x, layer.view) == "weight"  # 64 tokens > 4 outputs
        assert adapter.multiplicative_path(x[:2], layer.view) == "activation"
    conv = get_adapter_model(nn.Sequential(nn.Conv2d(2, 3, 3)), HRAConfig(r=4, target_modules=["0"])).base_model[0]
    assert conv.adapters["default"].multiplicative_path(torch.randn(1, 2, 5, 5), conv.view) == "weight"


def test_lowrank_path_with_an_additive_adapter_equals_dense():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9)
    model = get_adapter_model(
        nn.Sequential(copy.deepcopy(lin)), HRAConfig(r=4, target_modules=["0"], init_weights=False)
    )
    model.add_adapter("l", LoraConfig(r=2, target_modules=["0"], init_weights=False))
    model.set_adapter(["default", "l"])
    layer = model.base_model[0]
    u, lora = layer.adapters["default"].hra_u.detach(), layer.adapters["l"]
    w = (
        lin.weight.detach().double() @ dense_h(u.double())
        + (lora.scaling * lora.lora_B @ lora.lora_A).detach().double()
    )
    x = torch.randn(40, 12)
    assert layer.adapters["default"].multiplicative_path(x, layer.view) == "lowrank"
    assert torch.allclose(model(x), (x.double() @ w.T + lin.bias.double()).float(), atol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=(3, 2), stride=(2, 1), dilation=2, padding=(1, 0)),
        dict(kernel_size=(3, 2), dilation=2, padding="same"),  # torch forbids "same" with stride > 1
    ],
)
def test_non_square_conv2d_equals_dense_definition(conv):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, **conv)
    model = get_adapter_model(
        nn.Sequential(copy.deepcopy(base)), HRAConfig(r=6, target_modules=["0"], init_weights=False)
    )
    u = hra_params(model)[0].detach()
    assert u.shape == (3 * 3 * 2, 6)
    w_dense = (base.weight.reshape(5, -1) @ dense_h(u.double()).float()).reshape(base.weight.shape)
    x = torch.randn(2, 3, 11, 9)
    expected = F.conv2d(x, w_dense, base.bias, stride=base.stride, padding=base.padding, dilation=base.dilation)
    unmerged = model(x)
    assert torch.allclose(unmerged, expected, atol=1e-5)
    model.merge()
    assert torch.allclose(model(x), expected, atol=1e-5)
    model.unmerge()
    assert torch.allclose(model.base_model[0].base_layer.weight, base.weight, atol=1e-6)


def test_grouped_conv_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="groups=2"):
        get_adapter_model(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), HRAConfig(r=2, target_modules=["0"]))


def test_identity_at_init_and_odd_r_warns(bert, token_batch):
    expected = bert(**token_batch).logits
    model = get_adapter_model(copy.deepcopy(bert), HRAConfig(r=8, target_modules="all-linear"))
    assert torch.allclose(model(**token_batch).logits, expected, atol=1e-6)
    u = hra_params(model)[0]
    assert torch.equal(u[:, 0::2], u[:, 1::2]) and not torch.equal(u[:, 0], u[:, 2])
    with pytest.warns(UserWarning, match="odd r=3"):
        odd = get_adapter_model(copy.deepcopy(bert), HRAConfig(r=3, target_modules=["query"]))
    query = odd.base_model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(4, 32)
    assert (query(x) - query.base_layer(x)).abs().max() > 1e-2 * query.base_layer(x).abs().max()


def test_merge_unmerge_round_trip_and_spectrum(bert, token_batch):
    model = get_adapter_model(
        copy.deepcopy(bert), HRAConfig(r=8, target_modules=["query", "value"], init_weights=False)
    )
    before = model(**token_batch).logits
    w0 = bert.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    model.merge()
    layer = model.base_model.bert.encoder.layer[0].attention.self.query
    assert layer.merged == ["default"]
    assert torch.allclose(model(**token_batch).logits, before, atol=1e-5)
    merged_w = layer.base_layer.weight.detach()
    assert not torch.allclose(merged_w, w0, atol=1e-3)
    # H is orthogonal: W·H keeps W's singular values.
    assert torch.allclose(torch.linalg.svdvals(merged_w), torch.linalg.svdvals(w0), atol=1e-5)
    model.unmerge()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
    assert torch.allclose(model(**token_batch).logits, before, atol=1e-6)


def test_gram_schmidt_orthonormal_no_nan_even_with_symmetric_init(bert, token_batch):
    torch.manual_seed(0)
    u = torch.randn(40, 6).repeat_interleave(2, dim=1)  # paired columns: rank 6 of 12
    u.requires_grad_(True)
    q = orthonormal_columns(u)
    assert torch.allclose(q.T @ q, torch.eye(12), atol=1e-5)
    (g,) = torch.autograd.grad(q.sum(), [u])
    assert torch.isfinite(g).all()
    model = get_adapter_model(copy.deepcopy(bert), HRAConfig(r=8, target_modules=["query"], apply_GS=True))
    out = model(**token_batch).logits
    grads = torch.autograd.grad(out.sum(), hra_params(model))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_gram_schmidt_matches_peft_for_full_rank_u():
    torch.manual_seed(0)
    ours, theirs = _peft_pair(nn.Sequential(nn.Linear(16, 10)), ["0"], r=5, apply_GS=True)
    x = torch.randn(4, 16)
    assert rel_err(ours(x), theirs(x)) <= 1e-5


def test_orthogonality_regulariser_equals_formula(bert):
    lam = 1e-3
    model = get_adapter_model(
        copy.deepcopy(bert),
        HRAConfig(r=4, target_modules=["query", "value"], init_weights=False, orthogonality_weight=lam),
    )
    expected = 0.0
    for u in hra_params(model):
        un = u / u.norm(dim=0)
        expected += lam * torch.linalg.matrix_norm(torch.eye(4) - un.T @ un, "fro") ** 2
    assert torch.allclose(model.orthogonality_loss(), expected)
    assert torch.allclose(model.extra_loss(), expected)
    assert torch.allclose(orthogonality_penalty(torch.eye(5, 3)), torch.tensor(0.0))
    (g,) = torch.autograd.grad(model.extra_loss(), hra_params(model)[:1])
    assert g.abs().sum() > 0
    plain = get_adapter_model(copy.deepcopy(bert), HRAConfig(r=4, target_modules=["query"], init_weights=False))
    assert plain.orthogonality_loss().item() == 0.0 and not plain.extra_loss().requires_grad


def test_several_active_adapters_compose_in_order():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9)
    model = get_adapter_model(
        copy.deepcopy(nn.Sequential(lin)), HRAConfig(r=3, target_modules=["0"], init_weights=False), "a"
    )
    model.add_adapter("b", HRAConfig(r=4, target_modules=["0"], init_weights=False))
    model.set_adapter(["a", "b"])
    layer = model.base_model[0]
    ua, ub = layer.adapters["a"].hra_u.detach(), layer.adapters["b"].hra_u.detach()
    w = lin.weight.detach().double() @ dense_h(ua.double()) @ dense_h(ub.double())
    x = torch.randn(5, 12)
    assert torch.allclose(model(x), (x.double() @ w.T + lin.bias.double()).float(), atol=1e-5)
    model.merge()
    assert torch.allclose(layer.base_layer.weight.double(), w, atol=1e-5)
    model.unmerge()
    assert torch.allclose(layer.base_layer.weight, lin.weight, atol=1e-6)


def test_zero_column_is_an_identity_reflection():
    u = torch.randn(10, 3)
    u[:, 1] = 0
    v = normalized_columns(u)
    t = householder_wy(v)
    expected = dense_h(u[:, [0, 2]].double()).float()
    assert torch.allclose(torch.eye(10) - v @ t @ v.T, expected, atol=1e-5)


def test_bf16_model_runs_close_to_fp32(bert, token_batch):
    config = HRAConfig(r=8, target_modules=["query", "value", "dense"], init_weights=False)
    ref = get_adapter_model(copy.deepcopy(bert), config)
    low = get_adapter_model(copy.deepcopy(bert).to(torch.bfloat16), config)
    with torch.no_grad():
        for p_low, p_ref in zip(hra_params(low), hra_params(ref), strict=True):
            p_low.copy_(p_ref)
    assert hra_params(low)[0].dtype == torch.float32  # adapters train in fp32 on a bf16 model
    out = low(**token_batch).logits
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref(**token_batch).logits) < 3e-2
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in hra_params(low))
    low.merge()  # merging in bf16 works through an fp32 copy
    assert rel_err(low(**token_batch).logits.float(), ref(**token_batch).logits) < 3e-2


def test_symmetric_init_is_exactly_identity_in_float64():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = get_adapter_model(nn.Sequential(nn.Linear(30, 7).double()), HRAConfig(r=6, target_modules=["0"]))
    x = torch.randn(4, 30, dtype=torch.float64)
    assert torch.allclose(m(x), m.base_model[0].base_layer(x), atol=1e-13)
