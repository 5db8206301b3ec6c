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
