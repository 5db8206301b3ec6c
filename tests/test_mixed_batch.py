"""Mixed-adapter batches: ``model(**batch, adapter_names=[...])`` gives each row what running it with its own
adapter (``set_adapter``) or with none (``disable_adapter``) gives, for every registered method and for composed
entries, also through ``generate`` with greedy search and with beams; on the batched path (stacked adapters,
per-row gathered weights, :mod:`peftlab.batched`) and on the grouped one (:func:`peftlab.mixed.grouped_rows`).

Tolerance: 1e-5 absolute on logits and hidden states of O(1) (fp32): the batched path folds the scaling into B
and sums in another order than the per-row run, so rows agree to rounding, not bit for bit."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import AdapterError, AdapterModel, MergeError, get_adapter_model
from peftlab.methods.base import ADAPTERS
from peftlab.mixed import BASE, grouped_rows

METHODS = sorted(ADAPTERS)
ATOL = 1e-5


def perturb(model: AdapterModel, seed: int = 0, scale: float = 0.3) -> None:
    """Move every adapter parameter and modules_to_save copy away from its init, so each adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model._layers():
            for p in layer.adapters.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for _, wrapper in model._copies():
            for p in wrapper.copies.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def with_every_method(base, targets: list[str], saved: list[str] | None = None) -> AdapterModel:
    """Two adapters of each registered method (``<method>_a``, ``<method>_b``); the first also trains ``saved``."""
    model = None
    for i, method in enumerate(METHODS):
        for suffix in ("a", "b"):
            config = ADAPTERS[method].config_class(
                r=2, target_modules=targets, modules_to_save=saved if (i, suffix) == (0, "a") else None
            )
            if model is None:
                model = get_adapter_model(base, config, f"{method}_{suffix}")
            else:
                model.add_adapter(f"{method}_{suffix}", config)
    perturb(model)
    return model.eval()


def entries_for(model: AdapterModel) -> list:
    """Every adapter once, the base model twice, and two composed rows (one per method, and a pair)."""
    names = list(model.peft_config)
    return [BASE, *names, [f"{m}_a" for m in METHODS], BASE, [names[-1], names[0]]]


def reference(model: AdapterModel, entry, call) -> torch.Tensor:
    """``call()`` with the entry's adapters active (or disabled for the base model)."""
    if entry == BASE:
        with model.disable_adapter():
            return call()
    model.set_adapter(entry)
    return call()


def assert_rows_match(model: AdapterModel, entries: list, call, mixed, atol: float = ATOL) -> None:
    base_rows = reference(model, BASE, call)
    for i, entry in enumerate(entries):
        expected = reference(model, entry, call)[i]
        err = (mixed[i] - expected).abs().max().item()
        assert err <= atol, f"row {i} ({entry}): max |mixed - per-row run| = {err:.3g} > {atol}"
        if entry != BASE:  # the adapter matters: a wrong grouping would show
            assert not torch.allclose(expected, base_rows[i], atol=1e-3), f"adapter {entry} changes nothing"


@pytest.mark.parametrize("grouped", [False, True], ids=["batched", "grouped"])
@torch.no_grad()
def test_bert_classifier_rows_equal_per_adapter_runs(grouped):
    model = with_every_method(tiny_bert(), ["query", "value", "output.dense"], saved=["classifier"])
    entries = entries_for(model)
    ids = torch.randint(0, 100, (len(entries), 9), generator=torch.Generator().manual_seed(1))

    def call():
        out = model(input_ids=ids, output_hidden_states=True)
        return torch.cat([out.hidden_states[-1].flatten(1), out.logits], dim=1)

    with grouped_rows() if grouped else contextlib.nullcontext():
        mixed = model(input_ids=ids, output_hidden_states=True, adapter_names=entries)
    mixed = torch.cat([mixed.hidden_states[-1].flatten(1), mixed.logits], dim=1)
    assert_rows_match(model, entries, call, mixed)
    # a row run alone (batch of one) gives the same as in the mixed batch
    model.set_adapter(entries[3])
    torch.testing.assert_close(model(input_ids=ids[3:4]).logits[0], mixed[3, -2:], rtol=0, atol=ATOL)


@torch.no_grad()
def test_gpt2_logits_and_generation_equal_per_adapter_runs():
    model = with_every_method(tiny_gpt2(), ["c_attn", "c_proj"])
    entries = entries_for(model)
    ids = torch.randint(1, 100, (len(entries), 6), generator=torch.Generator().manual_seed(2))
    mixed = model(input_ids=ids, adapter_names=entries).logits
    assert_rows_match(model, entries, lambda: model(input_ids=ids).logits, mixed)

    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    greedy = model.generate(input_ids=ids, adapter_names=entries, **options)
    for i, entry in enumerate(entries):
        assert torch.equal(greedy[i], reference(model, entry, lambda: model.generate(input_ids=ids, **options))[i])

    beams = {**options, "num_beams": 3, "num_return_sequences": 2}
    k = beams["num_return_sequences"]
    beamed = model.generate(input_ids=ids[:5], adapter_names=entries[:5], **beams)
    assert beamed.shape[0] == 5 * k
    outputs = set()
    for i, entry in enumerate(entries[:5]):
        expected = reference(model, entry, lambda: model.generate(input_ids=ids[:5], **beams))
        assert torch.equal(beamed[i * k:(i + 1) * k], expected[i * k:(i + 1) * k]), f"row {i} ({entry})"
        outputs.add(tuple(beamed[i * k].tolist()))
    assert len(outputs) > 1  # the adapters lead to different generations, so rows cannot be mixed up unseen


@torch.no_grad()
def test_base_layer_calls_batched_and_grouped():
    """Batched: one base-layer call for every row (HRA rows' inputs reflected first). Grouped: one call for all
    additive groups, one per composed group."""
    model = with_every_method(tiny_bert(), ["query"])
    additive = [n for n in model.peft_config if not ADAPTERS[model.peft_config[n].method].multiplicative]
    multiplicative = [n for n in model.peft_config if n not in additive]
    layer = model.base_model.bert.encoder.layer[0].attention.self.query
    calls = []
    layer.base_layer.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    entries = [BASE, *additive, *additive, *multiplicative]
    model(input_ids=torch.ones(len(entries), 4, dtype=torch.long), adapter_names=entries)
    assert calls == [len(entries)]
    calls.clear()
    with grouped_rows():
        model(input_ids=torch.ones(len(entries), 4, dtype=torch.long), adapter_names=entries)
    assert calls[0] == 1 + 2 * len(additive)
    assert sorted(calls[1:]) == [1] * len(multiplicative)


def test_refusals_say_what_to_do():
    model = with_every_method(tiny_bert(), ["query"])
    ids = torch.ones(2, 4, dtype=torch.long)
    name = METHODS[0] + "_a"
    with pytest.raises(AdapterError, match=r"no adapter named 'nope'; loaded adapters: \[.*" + name):
        model(input_ids=ids, adapter_names=[name, "nope"])
    with pytest.raises(AdapterError, match="3 entries but the batch has 2 rows"):
        model(input_ids=ids, adapter_names=[name, name, BASE])
    with pytest.raises(AdapterError, match="one entry per row"):
        model(input_ids=ids, adapter_names=name)
    with pytest.raises(AdapterError, match="composes '__base__'"):
        model(input_ids=ids, adapter_names=[[name, BASE], name])
    with pytest.raises(AdapterError, match="inside disable_adapter"), model.disable_adapter():
        model(input_ids=ids, adapter_names=[name, name])
    model.train()
    with pytest.raises(AdapterError, match=r"model.eval\(\)"):
        model(input_ids=ids, adapter_names=[name, name])
    model.eval()
    model.set_adapter("lora_a")
    model.merge()
    with pytest.raises(MergeError, match=r"unmerge\(\) first"):
        model.generate(input_ids=ids, adapter_names=[name, name], max_new_tokens=1)
    model.unmerge()
    with torch.no_grad():
        model(input_ids=ids, adapter_names=[name, BASE])
    assert all(m.row_plan is None for _, m in (*model._layers(), *model._copies()))  # the plan is gone after the call


def test_composed_entry_may_not_hold_two_copies_of_a_saved_module():
    model = get_adapter_model(tiny_bert(), ADAPTERS["lora"].config_class(r=2, target_modules=["query"],
                                                                          modules_to_save=["classifier"]), "a")
    model.add_adapter("b", ADAPTERS["lora"].config_class(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    model.eval()
    with pytest.raises(AdapterError, match="cannot be composed in one row"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), adapter_names=[["a", "b"]])


# -- the batched path: per method, adapters of different ranks, base rows, composed rows ----------------------------
RANKED = {  # three adapters per method, ranks 2, 4, 6 and other options that change what is stacked
    "lora": [{"use_rslora": True}, {}, {"alpha": 3.0}],
    "mtlora": [{"structure": "icfm"}, {"structure": "ctcm", "fused": "per_slice"}, {"structure": "dtsm"}],
    "hydralora": [{"num_heads": 2}, {"num_heads": 3, "router_temperature": 2.0}, {"num_heads": 4}],
    "hra": [{}, {"apply_GS": True}, {}],
}
RANK_ENTRIES = [BASE, "a", "b", "c", BASE, "c", "a", ["a", "b"], ["c", "b", "a"], "b"]


def last_hidden(model: AdapterModel, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, output_hidden_states=True, **kwargs).hidden_states[-1]


def ranked_model(base, method: str, targets: list[str], extra: dict | None = None) -> AdapterModel:
    model = None
    for (name, r), options in zip((("a", 2), ("b", 4), ("c", 6)), RANKED[method], strict=True):
        config = ADAPTERS[method].config_class(r=r, target_modules=targets, **options, **(extra or {}))
        model = get_adapter_model(base, config, name) if model is None else model.add_adapter(name, config) or model
    perturb(model, scale=0.3)
    return model.eval()


@pytest.mark.parametrize("method", sorted(RANKED))
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@torch.no_grad()
def test_batched_rows_of_every_method_with_three_ranks(method, arch):
    """Three adapters of one method with r = 2, 4, 6 (stacked with zero padding), base rows, rows composing two and
    three of them (slots), rows in no particular order: each row equals its per-row run, and each adapted layer
    calls its base layer once for all rows (the batched path ran, not the grouped fallback). Tolerance 5e-5 on
    values up to ~3: updates of O(10) (rs-LoRA's s = 8/√2, parameters moved by 0.3) summed in another order,
    amplified by BERT's LayerNorm (measured: up to 1.5e-5)."""
    base = tiny_bert() if arch == "bert" else tiny_gpt2()
    targets = ["query", "value", "output.dense"] if arch == "bert" else ["c_attn", "c_proj"]  # c_attn: fused q|k|v
    model = ranked_model(base, method, targets)
    ids = torch.randint(1, 100, (len(RANK_ENTRIES), 7), generator=torch.Generator().manual_seed(3))
    calls = []
    for _, layer in model._layers():
        layer.base_layer.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))

    def output(rows: torch.Tensor, **kwargs) -> torch.Tensor:  # logits (GPT-2), last hidden states (BERT)
        return model(input_ids=rows, **kwargs).logits if arch == "gpt2" else last_hidden(model, rows, **kwargs)

    mixed = output(ids, adapter_names=RANK_ENTRIES)
    assert calls == [len(RANK_ENTRIES)] * len(list(model._layers()))
    assert_rows_match(model, RANK_ENTRIES, lambda: output(ids), mixed, atol=5e-5)
    for entries in (["b"] * 4, ["c", "c", "a", "a"]):  # every row one adapter; consecutive rows (added in the GEMM)
        mixed = output(ids[:4], adapter_names=entries)
        assert_rows_match(model, entries, lambda: output(ids[:4]), mixed, atol=5e-5)


@torch.no_grad()
def test_hydralora_routers_of_both_inputs_and_top_k_stack_apart():
    """HydraLoRA adapters routing on x and on A·x, dense and top-k, in one batch (separate stacks)."""
    model = get_adapter_model(tiny_gpt2(), ADAPTERS["hydralora"].config_class(r=2, num_heads=3, target_modules=[
        "c_attn"]), "x")
    model.add_adapter("lora_in", ADAPTERS["hydralora"].config_class(r=4, num_heads=2, router_input="lora",
                                                                    target_modules=["c_attn"]))
    model.add_adapter("top1", ADAPTERS["hydralora"].config_class(r=3, num_heads=4, top_k=1, target_modules=["c_attn"]))
    perturb(model)
    model.eval()
    entries = ["top1", BASE, "x", "lora_in", ["lora_in", "top1"], "x"]
    ids = torch.randint(1, 100, (len(entries), 5), generator=torch.Generator().manual_seed(4))
    mixed = model(input_ids=ids, adapter_names=entries).logits
    assert_rows_match(model, entries, lambda: model(input_ids=ids).logits, mixed)


@torch.no_grad()
def test_layers_without_a_batched_form_fall_back_to_grouped_rows():
    """LoRA on an Embedding (no batched form) next to LoRA and HRA on Linear layers: rows still match."""
    model = get_adapter_model(tiny_bert(), ADAPTERS["lora"].config_class(
        r=2, target_modules=["word_embeddings", "value"]), "emb")
    model.add_adapter("hra", ADAPTERS["hra"].config_class(r=2, target_modules=["value"], init_weights=False))
    perturb(model)
    model.eval()
    entries = ["emb", BASE, "hra", ["hra", "emb"]]
    ids = torch.randint(1, 100, (len(entries), 5), generator=torch.Generator().manual_seed(5))
    mixed = last_hidden(model, ids, adapter_names=entries)
    assert_rows_match(model, entries, lambda: last_hidden(model, ids), mixed)


@torch.no_grad()
def test_stacks_follow_changed_deleted_and_added_adapters():
    """The cached stacks are rebuilt after an in-place update (as a training step or load_adapter makes), after
    deleting an adapter and adding another under the same name with another rank, and after ``.double()``."""
    model = ranked_model(tiny_bert(), "lora", ["query", "value"])
    entries = ["a", "b", BASE, "c"]
    ids = torch.randint(1, 100, (len(entries), 5), generator=torch.Generator().manual_seed(6))
    call = lambda: last_hidden(model, ids)  # noqa: E731
    first = last_hidden(model, ids, adapter_names=entries)
    perturb(model, seed=1)  # p.add_(...) in place
    second = last_hidden(model, ids, adapter_names=entries)
    assert not torch.allclose(first[0], second[0], atol=1e-3)
    assert_rows_match(model, entries, call, second, atol=5e-5)
    model.delete_adapter("b")
    model.add_adapter("b", ADAPTERS["lora"].config_class(r=3, target_modules=["query", "value"], init_weights=False))
    model.eval()
    assert_rows_match(model, entries, call, last_hidden(model, ids, adapter_names=entries), atol=5e-5)
    model.double()
    mixed = last_hidden(model, ids, adapter_names=entries)
    assert mixed.dtype == torch.float64
    assert_rows_match(model, entries, call, mixed, atol=1e-10)


@torch.no_grad()
def test_hra_stacks_follow_a_changed_base_weight():
    """A row with one HRA adapter adds x·(W·H − W)ᵀ with W·V·T cached: changing W in place rebuilds it."""
    model = ranked_model(tiny_bert(), "hra", ["value"])
    entries = ["a", BASE, "c", "b"]
    ids = torch.randint(1, 100, (len(entries), 5), generator=torch.Generator().manual_seed(7))
    last_hidden(model, ids, adapter_names=entries)
    for _, layer in model._layers():
        layer.base_layer.weight.mul_(1.5)
    mixed = last_hidden(model, ids, adapter_names=entries)
    assert_rows_match(model, entries, lambda: last_hidden(model, ids), mixed, atol=5e-5)


def integer_valued(*shape: int, seed: int) -> torch.Tensor:
    """Small integers as fp32: every product and sum below is exact, in any order, on any CPU."""
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float()


def test_padding_ranks_with_zeros_is_exact():
    """A term stacked next to wider ones (ranks padded with zeros) gives exactly its unpadded result. Integer-valued
    tensors make every floating-point sum exact whatever its order, so equality checks the padding, not rounding."""
    from peftlab.batched import LowRank, LowRankStack, Reflections, ReflectionStack, reflections_as_lowrank

    x = integer_valued(2, 5, 6, seed=0)
    low = [LowRank(integer_valued(r, 6, seed=r), integer_valued(4, r, seed=10 + r)) for r in (1, 3, 5)]
    stack = LowRankStack(low)
    assert stack.a.shape == (4, 5, 6) and not stack.a[3].any()  # 3 terms, then the zero entry
    for k, term in enumerate(low):
        got = torch.bmm(*stack.features(x, stack.gather(torch.tensor([k, k]), torch.float32)))
        assert torch.equal(got, (x @ term.a.t()) @ term.b.t())
    refl = [Reflections(integer_valued(6, r, seed=20 + r), integer_valued(r, r, seed=30 + r)) for r in (2, 4)]
    stack = ReflectionStack(refl)
    for k, term in enumerate(refl):
        got = stack.apply(x, stack.gather(torch.tensor([k, k]), torch.float32))
        assert torch.equal(got, x - ((x @ term.v) @ term.t.t()) @ term.v.t())
    weight = integer_valued(4, 6, seed=40)  # one reflection chain in a row: x·(W·H − W)ᵀ, stacked with LoRA terms
    stack = LowRankStack([*low, *(reflections_as_lowrank(term, weight) for term in refl)])
    for k, term in enumerate(refl, start=len(low)):
        got = torch.bmm(*stack.features(x, stack.gather(torch.tensor([k, k]), torch.float32)))
        h = torch.eye(6) - term.v @ term.t @ term.v.t()
        assert torch.equal(got, x @ (weight @ h - weight).t())


def test_padded_hydralora_heads_get_exactly_zero_weight():
    """HydraLoRA heads padded to the largest N get router logit −∞, so ω = 0 exactly there, and the term's Δ equals
    its unpadded one (1e-6: the softmax may sum in another order)."""
    from peftlab.batched import RoutedStack
    from peftlab.layers import LayerView
    from peftlab.methods.hydralora import HydraLoraAdapter, HydraLoraConfig

    view = LayerView(torch.nn.Linear(6, 4))
    seen = []
    adapters = []
    for r, n in ((2, 2), (3, 4)):
        adapter = HydraLoraAdapter(view, HydraLoraConfig(r=r, num_heads=n, init_weights=False), r)
        adapters.append(adapter)
    terms = [a.batched_term(view) for a in adapters]
    terms = [type(t)(**{**t.__dict__, "weights_of": lambda z, f=t.weights_of: seen.append(f(z)) or seen[-1]})
             for t in terms]
    x = torch.randn(1, 5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        padded = RoutedStack(terms)
        got = torch.bmm(*padded.features(x, padded.gather(torch.tensor([0]), torch.float32)))
        assert seen[-1].shape[-1] == 4 and torch.equal(seen[-1][..., 2:], torch.zeros(1, 5, 2))
        alone = RoutedStack(terms[:1])
        unpadded = torch.bmm(*alone.features(x, alone.gather(torch.tensor([0]), torch.float32)))
        torch.testing.assert_close(got, unpadded, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[0], adapters[0].delta(x[0], view), rtol=0, atol=1e-6)


@torch.no_grad()
def test_rows_without_an_adapter_are_left_out_of_every_adapter_product():
    """Base rows take no part in a slot used by at most half of the rows (its row index leaves them out); a batch
    of base rows runs no adapter term.
    A row with one HRA adapter adds it as a low-rank term; rows composing two reflect their input first."""
    model = ranked_model(tiny_bert(), "hra", ["query"])
    layer = model.base_model.bert.encoder.layer[0].attention.self.query
    from peftlab.mixed import RowPlan

    x = torch.randn(4, 3, 32)
    run = RowPlan([(), ("a",), (), ("c",)]).run_for(layer, x)
    assert [slot.index.tolist() for slot in run.deltas] == [[1, 3]] and not run.transforms
    run = RowPlan([("a", "b"), (), ("c",), ("b", "a")]).run_for(layer, x)
    assert sorted(slot.index.tolist() for slot in run.transforms) == [[0, 3], [0, 3]]
    assert [slot.index.tolist() for slot in run.deltas] == [[2]]
    run = RowPlan([(), ()]).run_for(layer, x[:2])
    assert not run.transforms and not run.deltas
    torch.testing.assert_close(run.forward(x[:2], layer.base_layer), layer.base_layer(x[:2]), rtol=0, atol=0)


MAJORITY = [["a", "b"], BASE, ["c", "a"], "b", ["b", "c"], ["a", "c"], BASE]  # slots 0 and 1: 5 and 4 of 7 rows


@pytest.mark.parametrize("method", sorted(RANKED))
@torch.no_grad()
def test_slots_used_by_most_rows_run_on_every_row(method):
    """A slot used by more than half of the rows, not consecutive, runs on every row (its weights gathered for
    all of them, the other rows on the stack's zero entry) instead of gathering its rows: HRA's reflections on
    the composed rows, every other method's low-rank or routed slots. Ranks 2, 4, 6 padded into one stack. Base
    rows come out of the layer exactly as from the base layer (zero entries add exact zeros / reflect by I),
    and every row of the model equals its per-row run (tolerance as in the three-ranks test)."""
    model = ranked_model(tiny_bert(), method, ["query", "value"])
    layer = model.base_model.bert.encoder.layer[0].attention.self.query
    from peftlab.mixed import RowPlan

    entries = [(e,) if isinstance(e, str) else tuple(e) for e in MAJORITY]
    x = torch.randn(len(entries), 3, 32, generator=torch.Generator().manual_seed(8))
    run = RowPlan([() if e == (BASE,) else e for e in entries]).run_for(layer, x)
    dense = run.transforms if method == "hra" else run.deltas  # (HRA's one single row: a low-rank span)
    assert len(dense) == 2 and all(slot.index is None for slot in dense)
    assert all(slot.weights[0].shape[0] == len(entries) for slot in dense)
    out, base_out = run.forward(x, layer.base_layer), layer.base_layer(x)
    for i in (1, 6):
        assert torch.equal(out[i], base_out[i])

    ids = torch.randint(1, 100, (len(MAJORITY), 6), generator=torch.Generator().manual_seed(9))
    mixed = last_hidden(model, ids, adapter_names=MAJORITY)
    assert_rows_match(model, MAJORITY, lambda: last_hidden(model, ids), mixed, atol=5e-5)
