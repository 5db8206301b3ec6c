"""Mixed-adapter batches: ``model(**batch, adapter_names=[...])`` gives each row what running it with its own
adapter (``set_adapter``) or with none (``disable_adapter``) gives, for every registered method and for composed
entries, also through ``generate`` with greedy search and with beams."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import AdapterError, AdapterModel, MergeError, get_adapter_model
from peftlab.methods.base import ADAPTERS
from peftlab.mixed import BASE

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


def assert_rows_match(model: AdapterModel, entries: list, call, mixed) -> None:
    base_rows = reference(model, BASE, call)
    for i, entry in enumerate(entries):
        expected = reference(model, entry, call)[i]
        torch.testing.assert_close(mixed[i], expected, rtol=0, atol=ATOL, msg=f"row {i} ({entry})")
        if entry != BASE:  # the adapter matters: a wrong grouping would show
            assert not torch.allclose(expected, base_rows[i], atol=1e-3), f"adapter {entry} changes nothing"


@torch.no_grad()
def test_bert_classifier_rows_equal_per_adapter_runs():
    model = with_every_method(tiny_bert(), ["query", "value", "output.dense"], saved=["classifier"])
    entries = entries_for(model)
    ids = torch.randint(0, 100, (len(entries), 9), generator=torch.Generator().manual_seed(1))

    def call():
        out = model(input_ids=ids, output_hidden_states=True)
        return torch.cat([out.hidden_states[-1].flatten(1), out.logits], dim=1)

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
def test_additive_groups_share_one_base_layer_call():
    """Rows are grouped inside the layer: one base-layer call for all additive groups, one per composed group."""
    model = with_every_method(tiny_bert(), ["query"])
    additive = [n for n in model.peft_config if not ADAPTERS[model.peft_config[n].method].multiplicative]
    multiplicative = [n for n in model.peft_config if n not in additive]
    layer = model.base_model.bert.encoder.layer[0].attention.self.query
    calls = []
    layer.base_layer.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    entries = [BASE, *additive, *additive, *multiplicative]
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
