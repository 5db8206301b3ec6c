"""A new method is a config class and an Adapter, registered in a few lines: no peftlab file changes.

The toy method here is LoRA with a frozen random A (LoRA-FA): ΔW = B·A, only B trains. It is registered
inside this file (and by a fake installed package through the ``peftlab.methods`` entry point), then
trained, evaluated and inspected through the command line like a built-in method.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from test_cli import tiny  # noqa: F401  (the tiny model fixture)
from torch import Tensor, nn

from peftlab import AdapterConfig, get_adapter_model
from peftlab.cli import main
from peftlab.config import METHODS, check_finite, register_method
from peftlab.layers import LayerView
from peftlab.methods.base import ADAPTERS, Adapter


@dataclass
class ToyConfig(AdapterConfig):
    """LoRA-FA: A frozen (random), B trainable; y = W·x + scale·B·A·x."""

    method: ClassVar[str] = "toy-fa"
    description: ClassVar[str] = "toy LoRA-FA (frozen A), registered by a test"
    default_lr: ClassVar[float] = 5e-3
    cli_fields: ClassVar[tuple[str, ...]] = ("scale",)
    scale: float = field(default=1.0, metadata={"help": "the toy's scaling factor"})

    def validate(self) -> None:
        super().validate()
        check_finite("scale", self.scale)


class ToyAdapter(Adapter):
    config_class = ToyConfig

    def __init__(self, layer: LayerView, config: ToyConfig, r: int) -> None:
        super().__init__(layer, config, r)
        self.scale = config.scale
        self.register_buffer("toy_A", torch.randn(r, layer.d_in) / layer.d_in**0.5)
        self.toy_B = nn.Parameter(torch.zeros(layer.d_out, r))

    def delta(self, x: Tensor, layer: LayerView) -> Tensor:
        return self.scale * (x.to(self.toy_B.dtype) @ self.toy_A.t()) @ self.toy_B.t()

    def merged_weight(self, weight: Tensor, **options: Any) -> Tensor:
        return weight + (self.scale * self.toy_B @ self.toy_A).to(weight.dtype)

    def unmerged_weight(self, weight: Tensor, **options: Any) -> Tensor:
        return weight - (self.scale * self.toy_B @ self.toy_A).to(weight.dtype)


# Defining ToyAdapter registered it (Adapter.__init_subclass__): only the fixture's tests may see it, not the
# test modules collected after this one (they parametrise over the registry).
ADAPTERS.pop(ToyConfig.method, None)


@pytest.fixture
def toy_method():
    register_method(ToyConfig)
    ADAPTERS[ToyConfig.method] = ToyAdapter
    yield ToyConfig
    METHODS.pop(ToyConfig.method, None)
    ADAPTERS.pop(ToyConfig.method, None)


def test_a_method_registered_in_a_test_trains_through_the_cli(toy_method, tiny, tmp_path, capsys):  # noqa: F811
    assert main(["train", "--help"]) == 0
    assert "toy-fa: toy LoRA-FA" in capsys.readouterr().out  # --method lists it, with its description
    out = tmp_path / "toy"
    code = main(["train", "--model", str(tiny["model"]), "--data", str(tiny["keyword"]), "--method", "toy-fa",
                 "--scale", "2", "--r", "4", "--max-steps", "30", "--batch-size", "16", "--eval-steps", "30",
                 "--output-dir", str(out)])
    assert code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == "toy-fa" and config["scale"] == 2 and config["r"] == 4
    run = json.loads((out / "run_config.json").read_text())["options"]
    assert run["lr"] == 5e-3  # the method's own default learning rate
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > metrics["initial_test"]["accuracy"]  # it learnt something
    assert main(["eval", "--adapter", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "toy_B" in capsys.readouterr().out
    assert main(["train", "--model", str(tiny["model"]), "--data", str(tiny["small"]), "--method", "toy-fa",
                 "--scale", "big", "--output-dir", str(tmp_path / "bad")]) == 2  # the config checks fields
    assert "scale must be a finite number; got 'big'" in capsys.readouterr().err


def test_a_method_from_an_installed_package_registers_through_the_entry_point(tmp_path, monkeypatch):
    """A fake installed distribution whose entry point names a module that registers a method."""
    import peftlab.methods as config

    site = tmp_path / "site"
    (site / "toyplug-1.0.dist-info").mkdir(parents=True)
    (site / "toyplug-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 1.0\n")
    (site / "toyplug-1.0.dist-info" / "entry_points.txt").write_text("[peftlab.methods]\ntoy-plug = toyplug\n")
    (site / "toyplug.py").write_text(
        "from dataclasses import dataclass\nfrom typing import ClassVar\n"
        "from peftlab.config import register_method\nfrom peftlab.methods.lora import LoraConfig\n\n"
        "@register_method\n@dataclass\nclass ToyPlugConfig(LoraConfig):\n"
        "    method: ClassVar[str] = 'toy-plug'\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(config, "_plugins_loaded", False)
    try:
        assert "toy-plug" in config.registered_methods()
        assert AdapterConfig.from_dict({"method": "toy-plug", "r": 2, "target_modules": ["query"]}).r == 2
    finally:
        METHODS.pop("toy-plug", None)
        sys.modules.pop("toyplug", None)


def test_a_broken_plugin_warns_and_peftlab_still_works(tmp_path, monkeypatch):
    import peftlab.methods as config

    site = tmp_path / "site"
    (site / "badplug-1.0.dist-info").mkdir(parents=True)
    (site / "badplug-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: badplug\nVersion: 1.0\n")
    (site / "badplug-1.0.dist-info" / "entry_points.txt").write_text("[peftlab.methods]\nbad = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(config, "_plugins_loaded", False)
    with pytest.warns(UserWarning, match="plugin 'bad'.*failed to load"):
        methods = config.registered_methods()
    assert {"hra", "lora", "hydralora", "mtlora"} <= set(methods)


def test_the_toy_method_wraps_a_model_exactly(toy_method):
    from conftest import tiny_bert

    model = tiny_bert()
    batch = {"input_ids": torch.randint(0, 100, (2, 7))}
    with torch.no_grad():
        base = model(**batch).logits
        wrapped = get_adapter_model(model, ToyConfig(r=2, target_modules=["query"]))
        torch.testing.assert_close(wrapped(**batch).logits, base)  # B = 0 at the start
        for p in wrapped.parameters():
            if p.requires_grad:
                p.normal_()
        live = wrapped(**batch).logits
        wrapped.merge()
        torch.testing.assert_close(wrapped(**batch).logits, live, atol=1e-5, rtol=1e-4)
