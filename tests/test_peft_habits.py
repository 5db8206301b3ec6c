"""Habits users bring from HF PEFT: disable_adapter while merged, plain HF Trainer, deleting the active
adapter, shared biases and modules_to_save, in/out_features on wrapped layers, multi-adapter folders."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from peftlab import HydraLoraConfig, MergeError, get_adapter_model
from peftlab.methods.base import Adapter


# -- A: merge options are part of the merge record ---------------------------------------------------------------
def test_hydralora_merged_with_head_weights_survives_disable_adapter(token_batch):
    base = tiny_bert()
    base_out = base(**token_batch).logits
    config = HydraLoraConfig(r=2, num_heads=3, target_modules=["query", "value"], init_weights=False)
    model = get_adapter_model(base, config)
    routed_out = model(**token_batch).logits
    weights = [0.2, 0.3, 0.5]
    model.merge(head_weights=weights)
    merged_out = model(**token_batch).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(**token_batch).logits, base_out, rtol=0, atol=1e-5)
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(model(**token_batch).logits, merged_out, rtol=0, atol=1e-5)
    for _, layer in model._layers():
        assert layer.merge_record == {"default": {"head_weights": weights}}
    model.unmerge()
    torch.testing.assert_close(model(**token_batch).logits, routed_out, rtol=0, atol=1e-5)
    # the adapter keeps no hidden merge state: what was merged, and how, lives in the layer's record
    assert not any("merge" in key for a in model.modules() if isinstance(a, Adapter) for key in vars(a))


def test_unknown_merge_options_are_refused(token_batch):
    model = get_adapter_model(tiny_bert(), HydraLoraConfig(r=2, num_heads=2, target_modules=["query"]))
    with pytest.raises(MergeError, match=r"head_weight\b.*head_weights"):
        model.merge(head_weight=[0.5, 0.5])
    assert model.merged_adapters == []

