"""HydraLoRA: the one-GEMM forward against independent definitions, merging, routing, balance loss,
choosing N, save/load, GPT-2 Conv1D and a 2-process DDP step."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from torch import nn

from peftlab import AdapterModel, ConfigError, HydraLoraConfig, LoraConfig, MergeError, get_adapter_model
from peftlab.data.clusters import elbow_from_gains, estimate_num_heads
from peftlab.layers import LayerView
from peftlab.methods.hydralora import HydraLoraAdapter

# -- helpers -------------------------------------------------------------------------------------------------


def tiny_bert(seed: int = 0, classification: bool = False) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    model = BertForSequenceClassification(config) if classification else BertModel(config)
    return model.eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(config).eval()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


def adapters(model: AdapterModel) -> dict[str, HydraLoraAdapter]:
    return {name: layer.adapters["default"] for name, layer in model._layers()}


def loop_delta(x, a, heads, router_w, scaling, temperature=1.0, top_k=None, router_input="x"):
    """The definition, head by head: s·Σ_i ω_i·B_i·A·x with ω = softmax(W_g·u / T) (top-k renormalised)."""
    h = x @ a.t()
    logits = (x if router_input == "x" else h) @ router_w.t()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_k is not None:
        threshold = probs.sort(dim=-1, descending=True).values[..., top_k - 1 : top_k]
        probs = torch.where(probs >= threshold, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    out = torch.zeros(*x.shape[:-1], heads.shape[1], dtype=x.dtype)
    for i in range(heads.shape[0]):
        out = out + probs[..., i : i + 1] * (h @ heads[i].t())
    return scaling * out


def standalone(config: HydraLoraConfig, d_in: int = 12, d_out: int = 10, dtype=torch.float64):
    torch.manual_seed(0)
    view = LayerView(nn.Linear(d_in, d_out), "layer")
    return HydraLoraAdapter(view, config, config.r).to(dtype), view


# -- config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": 2.0}, "num_heads"),
        ({"num_heads": True}, "num_heads"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 5, "num_heads": 4}, "top_k"),
        ({"router_temperature": 0.0}, "router_temperature"),
        ({"router_temperature": float("inf")}, "router_temperature"),
        ({"router_input": "h"}, "router_input"),
        ({"balance_loss_weight": -0.1}, "balance_loss_weight"),
        ({"dropout": 1.0}, "dropout"),
        ({"alpha": float("nan")}, "alpha"),
        ({"r": 0}, "r"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        HydraLoraConfig(target_modules=["query"], **kwargs)


def test_config_json_round_trip_and_registration():
    config = HydraLoraConfig(r=4, num_heads=3, top_k=2, router_input="lora", target_modules=["query"])
    again = HydraLoraConfig.from_dict(config.to_dict())
    assert again == config and type(again) is HydraLoraConfig
    assert config.to_dict()["method"] == "hydralora"


# -- forward ---------------------------------------------------------------------------------------------------


def test_init_is_identity_and_parameters():
    base = tiny_bert()
    ids = input_ids()
    expected = base(ids).last_hidden_state
    model = get_adapter_model(base, HydraLoraConfig(r=4, num_heads=3, target_modules=["query", "value"]))
    assert torch.equal(model(ids).last_hidden_state, expected)  # every B_i = 0
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("router" in n for n in names)
    adapter = next(iter(adapters(model).values()))
    assert adapter.lora_A.shape == (4, 32) and adapter.lora_B.shape == (3, 32, 4)
    assert adapter.router.weight.shape == (3, 32) and adapter.router.bias is None
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 4 * (4 * 32 + 3 * 32 * 4 + 3 * 32)  # 2 layers × (query, value)


def test_one_head_equals_lora():
    ids = input_ids()
    hydra = get_adapter_model(
        tiny_bert(), HydraLoraConfig(r=4, alpha=8, num_heads=1, target_modules=["query", "value"], init_weights=False)
    )
    lora = get_adapter_model(tiny_bert(), LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    for name, h in adapters(hydra).items():
        target = lora.base_model.get_submodule(name).adapters["default"]
        with torch.no_grad():
            target.lora_A.copy_(h.lora_A)
            target.lora_B.copy_(h.lora_B[0])
    out = hydra(ids).last_hidden_state
    torch.testing.assert_close(out, lora(ids).last_hidden_state, rtol=0, atol=1e-6)
    assert not torch.allclose(out, tiny_bert()(ids).last_hidden_state, atol=1e-3)  # the adapter does something


def test_uniform_router_equals_lora_with_mean_head():
    ids = input_ids()
    hydra = get_adapter_model(
        tiny_bert(), HydraLoraConfig(r=4, alpha=8, num_heads=3, target_modules=["query", "value"], init_weights=False)
    )
    lora = get_adapter_model(tiny_bert(), LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    for name, h in adapters(hydra).items():
        target = lora.base_model.get_submodule(name).adapters["default"]
        with torch.no_grad():
            h.router.weight.zero_()  # ω = 1/N for every token
            target.lora_A.copy_(h.lora_A)
            target.lora_B.copy_(h.lora_B.mean(0))
    torch.testing.assert_close(hydra(ids).last_hidden_state, lora(ids).last_hidden_state, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{}, {"top_k": 2}, {"router_input": "lora"}, {"router_temperature": 0.5, "top_k": 3, "router_input": "lora"}],
)
def test_one_gemm_equals_loop_over_heads_values_and_gradients(options):
    config = HydraLoraConfig(r=3, alpha=6, num_heads=4, init_weights=False, **options)
    adapter, view = standalone(config)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(2, 5, 10, dtype=torch.float64)
    out = adapter.delta(x, view)
    grads = torch.autograd.grad((out * cotangent).sum(), [x, adapter.lora_A, adapter.lora_B, adapter.router.weight])
    params = [x, adapter.lora_A, adapter.lora_B, adapter.router.weight]
    ref = loop_delta(
        x, *params[1:], scaling=2.0, temperature=config.router_temperature, top_k=config.top_k,
        router_input=config.router_input,
    )  # fmt: skip
    ref_grads = torch.autograd.grad((ref * cotangent).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert want.abs().sum() > 0


def test_top1_routes_each_token_to_one_head():
    adapter, view = standalone(HydraLoraConfig(r=3, num_heads=4, top_k=1, init_weights=False))
    x = torch.randn(6, 12, dtype=torch.float64)
    out = adapter.delta(x, view)
    weights = adapter._weights
    assert torch.equal((weights > 0).sum(-1), torch.ones(6, dtype=torch.long))
    assert torch.equal(weights.max(-1).values, torch.ones(6, dtype=torch.float64))
    chosen = (x @ adapter.router.weight.t()).argmax(-1)
    assert torch.equal(weights.argmax(-1), chosen)
    single = torch.stack([x[t] @ adapter.lora_A.t() @ adapter.lora_B[chosen[t]].t() for t in range(6)])
    torch.testing.assert_close(out, adapter.scaling * single)


def test_large_temperature_gives_uniform_routing():
    adapter, view = standalone(HydraLoraConfig(r=3, num_heads=4, router_temperature=1e8, init_weights=False))
    adapter.delta(torch.randn(6, 12, dtype=torch.float64) * 10, view)
    torch.testing.assert_close(adapter._weights, torch.full((6, 4), 0.25, dtype=torch.float64), atol=1e-7, rtol=0)
    cold, view = standalone(HydraLoraConfig(r=3, num_heads=4, router_temperature=1e-3, init_weights=False))
    cold.delta(torch.randn(6, 12, dtype=torch.float64) * 10, view)
    assert (cold._weights.max(-1).values > 0.99).all()  # small T: nearly one-hot


def test_bf16_base_layer_output_type_and_fp32_routing():
    torch.manual_seed(0)
    model = get_adapter_model(
        nn.Sequential(nn.Linear(8, 6)).to(torch.bfloat16),
        HydraLoraConfig(r=2, num_heads=3, target_modules=["0"], init_weights=False),
    )
    y = model(torch.randn(4, 8, dtype=torch.bfloat16))
    adapter = next(iter(adapters(model).values()))
    assert type(y) is torch.Tensor and y.dtype == torch.bfloat16 and y.shape == (4, 6)
    assert adapter.lora_B.dtype == torch.float32 and adapter._weights.dtype == torch.float32


def test_rejects_unsupported_layers():
    with pytest.raises(ValueError, match=r"supports \['linear', 'conv1d'\]"):
        get_adapter_model(tiny_gpt2(), HydraLoraConfig(target_modules=["wte"]))


# -- merge -----------------------------------------------------------------------------------------------------


def test_merge_with_head_weights_equals_forced_router_and_unmerge_restores():
    ids = input_ids()
    model = get_adapter_model(
        tiny_bert(), HydraLoraConfig(r=4, num_heads=4, target_modules=["query", "value"], init_weights=False)
    )
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    base_weights = {n: layer.base_layer.weight.detach().clone() for n, layer in model._layers()}
    routed = model(ids).last_hidden_state
    for a in adapters(model).values():  # force ω = w for every token
        a.route = lambda u, a=a: (w.to(u.dtype).expand(*u.shape[:-1], 4),) * 2
    forced = model(ids).last_hidden_state
    for a in adapters(model).values():
        del a.route
    assert not torch.allclose(forced, routed, atol=1e-4)
    model.merge(head_weights=w.tolist())
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(model(ids).last_hidden_state, forced, rtol=0, atol=1e-5)
    model.unmerge()
    for n, layer in model._layers():
        torch.testing.assert_close(layer.base_layer.weight, base_weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids).last_hidden_state, routed, rtol=0, atol=1e-6)


def test_merge_without_or_with_bad_head_weights_raises():
    model = get_adapter_model(
        tiny_bert(), HydraLoraConfig(r=4, num_heads=3, target_modules=["query"], init_weights=False)
    )
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in model._layers()}
    with pytest.raises(MergeError, match=r"depends on the input.*head_weights=\["):
        model.merge()
    with pytest.raises(MergeError, match="num_heads=3"):
        model.merge(head_weights=[0.5, 0.5])
    with pytest.raises(MergeError, match="non-negative"):
        model.merge(head_weights=[1.5, -0.5, 0.0])
    with pytest.raises(MergeError, match="sum to 1"):
        model.merge(head_weights=[1.0, 1.0, 1.0])
    assert model.merged_adapters == []
    for n, layer in model._layers():
        assert torch.equal(layer.base_layer.weight, before[n])
    with pytest.raises(MergeError, match="needs the head_weights the adapter was merged with"):
        next(iter(adapters(model).values())).unmerged_weight(before[next(iter(before))])


# -- routing statistics and the balance loss --------------------------------------------------------------


def test_routing_stats_are_mean_router_weights():
    model = get_adapter_model(mlp(), HydraLoraConfig(r=2, num_heads=3, target_modules=["0"], init_weights=False))
    with pytest.raises(RuntimeError, match="forward"):
        model.routing_stats()
    x = torch.randn(5, 8)
    model(x)
    stats = model.routing_stats()
    assert list(stats) == ["0"]
    adapter = adapters(model)["0"]
    expected = torch.softmax(x @ adapter.router.weight.detach().t(), dim=-1).mean(0)
    assert stats["0"].shape == (3,) and not stats["0"].requires_grad
    torch.testing.assert_close(stats["0"], expected)
    assert math.isclose(float(stats["0"].sum()), 1.0, rel_tol=1e-6)


def test_balance_loss_matches_switch_formula_and_has_gradient():
    model = get_adapter_model(
        mlp(), HydraLoraConfig(r=2, num_heads=3, target_modules=["0", "2"], balance_loss_weight=0.05, top_k=1)
    )
    x = torch.randn(2, 9, 8)
    model(x)
    layers = adapters(model)
    expected = 0.0
    h = torch.tanh(model.base_model[0].base_layer(x))  # input of layer "2" (B_i = 0: the base output)
    for name, u in (("0", x), ("2", h)):
        probs = torch.softmax(u.reshape(-1, u.shape[-1]) @ layers[name].router.weight.t(), dim=-1)
        f = nn.functional.one_hot(probs.argmax(-1), 3).float().mean(0)
        expected = expected + 0.05 * 3 * (f * probs.mean(0)).sum()
    loss = model.extra_loss()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=0)
    loss.backward()
    assert all(a.router.weight.grad.abs().sum() > 0 for a in layers.values())
    with torch.no_grad():  # e.g. reentrant gradient checkpointing: the loss cannot train the router
        model(x)
    with pytest.warns(UserWarning, match="no gradient"):
        assert not model.extra_loss().requires_grad
    plain = get_adapter_model(mlp(), HydraLoraConfig(r=2, num_heads=3, target_modules=["0"]))
    plain(x)
    assert float(plain.extra_loss()) == 0.0  # balance_loss_weight = 0: no term


def test_trainer_adds_balance_loss(tmp_path):
    from transformers import TrainingArguments

    from peftlab import Trainer

    model = get_adapter_model(
        tiny_bert(classification=True),
        HydraLoraConfig(r=4, num_heads=3, target_modules=["query", "value"], balance_loss_weight=0.5),
    )
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args)
    inputs = {"input_ids": input_ids(), "labels": torch.tensor([0, 1])}
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    task_loss = model(**inputs).loss
    extra = model.extra_loss()
    assert float(extra.detach()) >= 0.5 * len(adapters(model)) - 1e-6  # N·Σf·P ≥ 1 per layer
    torch.testing.assert_close(loss, task_loss + extra, rtol=1e-6, atol=0)
    loss.backward()
    assert all(a.router.weight.grad.abs().sum() > 0 for a in adapters(model).values())


# -- choosing N ------------------------------------------------------------------------------------------------


def topic_corpus(num_topics: int, per_topic: int = 30, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Texts whose words come from one of ``num_topics`` disjoint synthetic vocabularies."""
    rng = np.random.default_rng(seed)
    texts, topics = [], []
    for t in range(num_topics):
        vocab = [f"t{t}w{i}" for i in range(40)]
        for _ in range(per_topic):
            texts.append(" ".join(rng.choice(vocab, size=int(rng.integers(6, 24)))))
            topics.append(t)
    return texts, np.array(topics)


def test_elbow_from_gains():
    null = [1.0, 0.97, 0.95, 0.93, 0.91]  # largest noise gain 3 %
    assert elbow_from_gains([1.0, 0.9, 0.8, 0.79, 0.78], null) == 3
    assert elbow_from_gains([1.0, 0.96, 0.92, 0.89, 0.86], null) == 1
    assert elbow_from_gains([1.0, 0.9, 0.8, 0.7, 0.6], null) == 5


def test_estimate_num_heads_finds_four_topics_and_one():
    texts, topics = topic_corpus(4)
    n, labels = estimate_num_heads(texts, max_heads=8)
    assert n == 4 and labels.shape == (len(texts),)
    for t in range(4):  # each topic is one cluster
        assert len(set(labels[topics == t].tolist())) == 1
    assert len(set(labels.tolist())) == 4
    n_dbscan, _ = estimate_num_heads(texts, max_heads=8, method="dbscan")
    assert n_dbscan == 4
    single, _ = topic_corpus(1, per_topic=120, seed=1)
    n, labels = estimate_num_heads(single, max_heads=8)
    assert n == 1 and set(labels.tolist()) == {0}


def test_estimate_num_heads_errors():
    with pytest.raises(ValueError, match="empty"):
        estimate_num_heads([])
    with pytest.raises(ValueError, match="max_heads"):
        estimate_num_heads(["a b c"], max_heads=0)
    with pytest.raises(ValueError, match="method"):
        estimate_num_heads(["a b c"], method="hdbscan")
    with pytest.raises(TypeError, match="one string"):
        estimate_num_heads("some text")


# -- save / load, GPT-2 ------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    ids = input_ids()
    config = HydraLoraConfig(r=4, num_heads=3, top_k=2, target_modules=["query", "value"], init_weights=False)
    model = get_adapter_model(tiny_bert(), config)
    expected = model(ids).last_hidden_state
    model.save_pretrained(tmp_path)
    keys = model.adapter_state_dict()
    assert any(k.endswith("router.weight") for k in keys) and any(k.endswith("lora_B") for k in keys)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.peft_config["default"] == config
    torch.testing.assert_close(loaded(ids).last_hidden_state, expected, rtol=0, atol=0)


def test_gpt2_conv1d_forward_and_gradients():
    model = get_adapter_model(
        tiny_gpt2(), HydraLoraConfig(r=4, num_heads=3, target_modules=["c_attn", "c_fc"], init_weights=False)
    )
    layer = model.base_model.transformer.h[0].attn.c_attn
    adapter = layer.adapters["default"]
    x = torch.randn(2, 5, 32)
    expected = layer.base_layer(x) + loop_delta(x, adapter.lora_A, adapter.lora_B, adapter.router.weight, 4.0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    ids = input_ids()
    model.train()
    model(ids, labels=ids).loss.backward()
    for a in adapters(model).values():
        assert (a.lora_B.grad.flatten(1).abs().sum(1) > 0).all()  # every head
        assert a.router.weight.grad.abs().sum() > 0 and a.lora_A.grad.abs().sum() > 0


# -- DDP ----------------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = HydraLoraConfig(
            r=2, num_heads=3, target_modules=["0", "2"], init_weights=False, balance_loss_weight=0.1
        )
        model = get_adapter_model(mlp(), config)
        ddp = DistributedDataParallel(model)  # find_unused_parameters=False: errors if a parameter got no grad
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        grads = []
        for step in range(2):
            torch.manual_seed(100 * step + rank)  # different data per rank
            loss = ddp(torch.randn(6, 8)).pow(2).mean() + model.extra_loss()
            optimizer.zero_grad()
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            optimizer.step()
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"grads": grads, "params": params}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_step(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, int(free_port()), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    for grads in ranks[0]["grads"]:
        assert sum(n.endswith(("lora_A", "lora_B", "router.weight")) for n in grads) == len(grads) == 6
        for name, grad in grads.items():
            per_head = grad.flatten(1).abs().sum(1) if name.endswith("lora_B") else grad.abs().sum().reshape(1)
            assert (per_head > 0).all(), name
