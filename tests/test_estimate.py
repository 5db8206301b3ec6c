"""``peftlab estimate``: exact parameter counts on the meta model, the memory arithmetic checked against hand-computed
numbers, the estimate within 20 % of a measured training step, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from peftlab import get_adapter_model
from peftlab.cli import main
from peftlab.errors import ConfigError, ModelError, PeftlabError, RecipeError, TargetError
from peftlab.estimate import estimate_memory, quantized_bytes
from peftlab.estimate_model import adapter_config, measured_peak, measured_unet_peak
from peftlab.methods import registered_methods

ROOT = Path(__file__).resolve().parents[1]
# h 256, 2 layers, MLP 688, vocab 8000: P = 2·8000·256 + 2·(4·256² + 3·256·688 + 2·256) + 256 = 5,678,336
SMALL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 8000, "max_position_embeddings": 512,
         "tie_word_embeddings": False}
SMALL_PARAMS = 5_678_336
LORA_R8 = 2 * 2 * (8 * 256 + 256 * 8)  # q_proj and v_proj of 2 layers, A (8 × 256) and B (256 × 8)
TOLERANCE = 0.2  # the estimate's goal: within 20 % of the measured peak


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(SMALL))
    return path


@pytest.mark.parametrize("method", sorted(registered_methods()))
def test_parameter_counts_equal_a_real_model(small, method):
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SMALL))
    total = sum(p.numel() for p in real.parameters())
    real = get_adapter_model(real, adapter_config(method, real, 8, None, None, unet=False))
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    estimate = estimate_memory(small, method, 8, precision="fp32", batch_size=1, seq_len=8)
    assert (estimate.base_parameters, estimate.trainable_parameters) == (total, trainable)
    assert total == SMALL_PARAMS
    assert estimate.base_weights == 4 * SMALL_PARAMS
    assert (estimate.adapter_weights, estimate.gradients, estimate.optimizer_states) == (
        4 * trainable, 4 * trainable, 8 * trainable)


def test_sharding_divides_by_definition(small):
    one = estimate_memory(small, "lora", 8, precision="bf16", batch_size=1, seq_len=8)
    assert one.trainable_parameters == LORA_R8
    assert one.base_weights == 2 * SMALL_PARAMS
    stages = {s: estimate_memory(small, "lora", 8, precision="bf16", batch_size=1, seq_len=8, zero_stage=s,
                                 num_devices=4) for s in (1, 2, 3)}
    assert stages[1].optimizer_states == 8 * LORA_R8 / 4 and stages[1].gradients == 4 * LORA_R8
    assert stages[2].gradients == 4 * LORA_R8 / 4 and stages[2].base_weights == 2 * SMALL_PARAMS
    assert stages[3].base_weights == 2 * SMALL_PARAMS / 4 and stages[3].adapter_weights == 4 * LORA_R8 / 4
    layer = 4 * 256**2 + 3 * 256 * 688 + 2 * 256 + 2 * (8 * 256 + 256 * 8)  # one decoder layer, adapters too
    assert stages[3].gathered_weights == 2 * layer
    fsdp = estimate_memory(small, "lora", 8, precision="bf16", batch_size=1, seq_len=8, fsdp=True, num_devices=4)
    assert fsdp.to_dict() | {"settings": None} == stages[3].to_dict() | {"settings": None}
    assert stages[3].activations == one.activations  # data parallel: activations are per device anyway


def test_quantized_base_bytes(small):
    # one 256 × 256 weight: NF4 0.5 byte each + a fp32 absmax per 64 values; double quant: 8-bit absmax + fp32 per 256
    assert quantized_bytes(65536, 256, "nf4") == 32768 + 4 * 1024
    assert quantized_bytes(65536, 256, "nf4-double") == 32768 + 1024 + 4 * 4
    assert quantized_bytes(65536, 256, "int8") == 65536 + 4 * 256
    # per layer 4 attention weights (256 × 256) and 3 MLP weights (688 × 256): 4·36864 + 3·(88064 + 4·2752)
    quantized = 2 * (4 * 36864 + 3 * (88064 + 4 * 2752))
    kept = 2 * (2 * 8000 * 256 + 2 * 2 * 256 + 256)  # embeddings, lm_head, norms in bf16
    estimate = estimate_memory(small, "lora", 8, precision="bf16", quantization="nf4", batch_size=1, seq_len=8)
    assert estimate.base_weights == quantized + kept


@pytest.mark.parametrize("method, precision, checkpointing", [("lora", "fp32", False), ("hra", "fp32", True)])
def test_estimate_within_20_percent_of_measured_peak(small, method, precision, checkpointing):
    estimate = estimate_memory(small, method, 8, batch_size=4, seq_len=256, precision=precision,
                               gradient_checkpointing=checkpointing)
    if checkpointing:  # the recomputed layer and the logits are never alive together: the larger counts
        assert 0 < estimate.recompute < estimate.logits_and_loss
        assert estimate.total == sum(estimate.to_dict()[k] for k in (
            "base_weights", "adapter_weights", "gradients", "optimizer_states", "activations", "logits_and_loss"))
    measured = measured_peak(SMALL, method, 8, 4, 256, precision, checkpointing)
    assert abs(estimate.total / measured - 1) <= TOLERANCE, (estimate.total, measured)


TINY_UNET = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "cross_attention_dim": 32,
             "sample_size": 32, "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 8,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D",
                                                                                          "CrossAttnUpBlock2D"]}


def test_unet_estimate_within_20_percent_of_measured_peak(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(TINY_UNET))  # a pipeline folder's layout
    estimate = estimate_memory(tmp_path, "hra", 4, batch_size=2, precision="fp32")
    measured = measured_unet_peak(TINY_UNET, "hra", 4, 2)
    assert abs(estimate.total / measured - 1) <= TOLERANCE, (estimate.total, measured)


def test_unet_config_counts_the_sd15_unet():
    estimate = estimate_memory(ROOT / "configs/models/sd-1.5-unet.json", "hra", 8, batch_size=1, precision="fp16")
    assert estimate.base_parameters == 859_520_964  # Stable Diffusion 1.5's UNet
    assert estimate.base_weights == 2 * 859_520_964 and estimate.logits_and_loss == 0 and estimate.activations > 0


@pytest.mark.parametrize("kwargs, error", [
    ({"method": "nope"}, RecipeError),
    ({"r": 300}, TargetError),
    ({"num_devices": 0}, ConfigError),
    ({"precision": "fp8"}, ConfigError),
])
def test_bad_input_is_one_clear_error(small, kwargs, error):
    with pytest.raises(error):
        estimate_memory(small, **kwargs)


def test_missing_config_json(tmp_path, capsys):
    with pytest.raises(ModelError, match="no config.json"):
        estimate_memory(tmp_path)
    assert main(["estimate", "--model", str(tmp_path / "absent.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peftlab estimate: error: config file")
    assert issubclass(ModelError, PeftlabError)


def test_cli_prints_the_table_and_json(small, capsys):
    assert main(["estimate", "--model", str(small), "--method", "lora", "--precision", "fp32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trainable_parameters"] == LORA_R8 and data["total"] == sum(
        data[k] for k in ("base_weights", "gathered_weights", "adapter_weights", "gradients", "optimizer_states",
                          "activations", "recompute", "logits_and_loss"))
    assert main(["estimate", "--model", str(small), "--r", "4"]) == 0
    assert "total per device" in capsys.readouterr().out
    # one plain name is a suffix, as in peftlab train (not a regex that would match nothing whole)
    assert main(["estimate", "--model", str(small), "--method", "lora", "--target-modules", "q_proj", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_parameters"] == LORA_R8 // 2
