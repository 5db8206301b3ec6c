"""HF PEFT interop: adapters saved by PEFT load into peftlab and vice versa, with equal outputs."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import tiny_bert
from test_core import Mixed

from peftlab import AdapterLoadError, AdapterModel, HRAConfig, LoraConfig, get_adapter_model
from peftlab.interop import load_peft_adapter  # the path README documents


def _perturb(model: torch.nn.Module) -> None:
    """Make every adapter tensor non-trivial so that a wrong mapping cannot pass."""
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("lora" in n or "hra" in n or "classifier" in n or n.endswith("bias")):
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("kind", ["hra", "lora"])
def test_peft_to_peftlab(kind, token_batch, tmp_path):
    if kind == "hra":
        config = peft.HRAConfig(r=4, target_modules=["query", "value"], bias="hra_only", modules_to_save=["classifier"])
    else:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "dense"], modules_to_save=["classifier"])
    theirs = peft.get_peft_model(tiny_bert(), config)
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(tiny_bert(), tmp_path)
    assert torch.allclose(ours(**token_batch).logits, theirs(**token_batch).logits, atol=1e-6)
    same = AdapterModel.from_pretrained(tiny_bert(), tmp_path)  # from_pretrained reads PEFT folders too
    torch.testing.assert_close(same(**token_batch).logits, ours(**token_batch).logits)
    mine = tmp_path / "peftlab"
    same.save_pretrained(mine)
    with pytest.raises(AdapterLoadError, match="is not a PEFT adapter"):
        load_peft_adapter(tiny_bert(), mine)


def test_peft_seq_cls_adapter_with_the_heads_peft_adds_loads(token_batch, tmp_path):
    """PEFT writes modules_to_save=["classifier", "score"] for task_type="SEQ_CLS"; BERT has no `score`."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(tiny_bert(), config)
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["modules_to_save"]) >= {"classifier", "score"}  # what PEFT wrote
    ours = load_peft_adapter(tiny_bert(), tmp_path)
    assert ours.peft_config["default"].modules_to_save == ["classifier"]
    torch.testing.assert_close(ours(**token_batch).logits, theirs(**token_batch).logits, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hra", "lora"])
def test_peftlab_to_peft(kind, token_batch, tmp_path):
    if kind == "hra":
        config = HRAConfig(r=4, target_modules=["query", "value"], init_weights=False, modules_to_save=["classifier"])
    else:
        config = LoraConfig(r=4, alpha=8, target_modules=["query", "dense"], modules_to_save=["classifier"], bias="all")
    ours = get_adapter_model(tiny_bert(), config)
    _perturb(ours)
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert torch.allclose(theirs(**token_batch).logits, ours(**token_batch).logits, atol=1e-6)
    back = load_peft_adapter(tiny_bert(), tmp_path)  # and back again
    assert torch.allclose(back(**token_batch).logits, ours(**token_batch).logits, atol=1e-6)


def test_lora_conv_and_embedding_round_trip_through_peft(tmp_path):
    torch.manual_seed(0)
    base = Mixed()
    ours = get_adapter_model(
        copy.deepcopy(base), LoraConfig(r=3, target_modules=["emb", "lin", "conv"], init_weights=False)
    )
    ours.save_pretrained(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 20, (2, 7))
    assert torch.allclose(theirs(ids), ours(ids), atol=1e-5)
    assert torch.allclose(load_peft_adapter(copy.deepcopy(base), tmp_path)(ids), ours(ids), atol=1e-5)


def test_unsupported_peft_adapters_are_refused(tmp_path):
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    theirs.save_pretrained(tmp_path / "dora")
    with pytest.raises(NotImplementedError, match="DoRA"):
        load_peft_adapter(tiny_bert(), tmp_path / "dora")
    theirs = peft.get_peft_model(tiny_bert(), peft.IA3Config(target_modules=["query"], feedforward_modules=[]))
    theirs.save_pretrained(tmp_path / "ia3")
    with pytest.raises(NotImplementedError, match=r"reads the PEFT adapters of its methods \['hra', 'lora'\]"):
        load_peft_adapter(tiny_bert(), tmp_path / "ia3")
