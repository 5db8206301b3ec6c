"""``peftlab inspect`` / merge / export on adapter folders that are wrong: one error line, exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from peftlab.cli import main


def adapter_folder(tmp_path, config: dict, tensors: dict | None = None):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors or {"bert.encoder.layer.0.attention.self.query.hra_u": torch.zeros(32, 2)},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "dora", "r": 2, "target_modules": ["query"]}, "method 'dora', which this peftlab does not know"),
        ({"method": "hra", "r": 0, "target_modules": ["query"]}, "r must be a positive integer; got 0"),
        ({"method": "lora", "r": 2, "target_modules": ["query"], "alpha": "big"}, "alpha must be a finite number"),
        ({"method": "hra", "r": 2, "target_modules": ["query"], "colour": 1}, "HRAConfig has no field(s) ['colour']"),
    ],
)
def test_inspect_refuses_an_invalid_adapter_config(config, message, tmp_path, capsys):
    assert main(["inspect", str(adapter_folder(tmp_path, config))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftlab inspect: error:") and message in err and "Traceback" not in err


def test_inspect_prints_the_methods_own_diagnostics_only(tmp_path, capsys):
    lora = adapter_folder(tmp_path, {"method": "lora", "r": 2, "target_modules": ["query"]},
                          {"q.lora_A": torch.zeros(2, 8), "q.lora_B": torch.zeros(8, 2)})
    assert main(["inspect", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "parameters per module (1 modules, 32 in all)" in out and "orthogonality" not in out


def test_merge_and_export_refuse_a_folder_without_an_adapter(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for command in ("merge", "export"):
        assert main([command, "--adapter", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
        assert "holds no adapter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inspect_and_loading_blame_a_config_that_does_not_match_its_own_weights(tmp_path, capsys):
    """adapter_config.json edited to r=8 over rank-4 weights: inspect exits 2, loading says config ≠ weights."""
    from conftest import tiny_bert

    from peftlab import AdapterModel, HRAConfig
    from peftlab.errors import AdapterLoadError

    folder = tmp_path / "hra"
    model = AdapterModel(tiny_bert(), HRAConfig(r=4, target_modules=["query"]))
    model.save_pretrained(folder)
    assert main(["inspect", str(folder)]) == 0 and "hra_u [32, 4]" in capsys.readouterr().out
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("peftlab inspect: error:"), err
    assert "the config says r=8 but the weights have rank 4 (module bert.encoder.layer.0.attention.self.query: " \
        "hra_u [32, 4])" in err
    assert "adapter_config.json does not match the saved weights" in err and "different base model" not in err
    with pytest.raises(AdapterLoadError, match="the config says r=8 but the weights have rank 4") as raised:
        AdapterModel.from_pretrained(tiny_bert(), folder)
    assert "different base model" not in str(raised.value)
    (folder / "adapter_config.json").write_text(json.dumps(config))  # restored: a different base still is one
    with pytest.raises(AdapterLoadError, match="different base model"):
        from transformers import BertConfig, BertForSequenceClassification

        AdapterModel.from_pretrained(BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)), folder)
