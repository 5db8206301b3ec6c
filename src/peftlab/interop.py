"""Reading and writing HF PEFT adapter folders (HRA and LoRA).

PEFT keys tensors ``base_model.model.<module>.<name>``; the tensors themselves are the same as
peftlab's up to layout:

| peftlab                      | PEFT                                                 |
|------------------------------|------------------------------------------------------|
| ``<m>.hra_u`` (d_in, r)      | ``<m>.hra_u``                                        |
| ``<m>.lora_A`` (r, d_in)     | ``<m>.lora_A.weight`` ((r, in, kh, kw) for Conv2d), ``<m>.lora_embedding_A`` |
| ``<m>.lora_B`` (d_out, r)    | ``<m>.lora_B.weight`` ((out, r, 1, 1) for Conv2d), ``<m>.lora_embedding_B`` |
| ``<m>.bias`` (trained bias)  | ``<m>.base_layer.bias`` on adapted layers            |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from peftlab import io
from peftlab.config import AdapterConfig
from peftlab.methods.hra import HRAConfig
from peftlab.methods.lora import LoraConfig
from peftlab.model import AdapterModel

PREFIX = "base_model.model."
SHARED_FIELDS = ("r", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
UNSUPPORTED_LORA = {
    "use_dora": "DoRA",
    "lora_bias": "a LoRA bias on B",
    "layer_replication": "layer replication",
    "alpha_pattern": "per-module alpha (alpha_pattern)",
    "target_parameters": "target_parameters",
}


def config_from_peft(data: dict[str, Any], model: nn.Module) -> AdapterConfig:
    """A peftlab config equivalent to a PEFT ``adapter_config.json`` (HRA or LoRA)."""
    peft_type = data.get("peft_type")
    common = {k: data[k] for k in SHARED_FIELDS if data.get(k) is not None}
    if data.get("task_type") == "SEQ_CLS":  # PEFT adds the classification head to modules_to_save
        heads = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("classifier", "score")]
        common["modules_to_save"] = sorted(set(common.get("modules_to_save", [])) | set(heads[:1]))
    if peft_type == "HRA":
        bias = data.get("bias", "none")
        return HRAConfig(apply_GS=bool(data.get("apply_GS", False)), bias=bias, **common)
    if peft_type == "LORA":
        for key, what in UNSUPPORTED_LORA.items():
            if data.get(key):
                raise NotImplementedError(f"this PEFT LoRA adapter uses {what} ({key}), which peftlab does not support")
        bias = data.get("bias", "none")
        return LoraConfig(
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            use_rslora=bool(data.get("use_rslora", False)),
            rank_pattern=data.get("rank_pattern") or {},
            bias=bias,
            **common,
        )
    raise NotImplementedError(f"peft_type={peft_type!r}: peftlab reads PEFT adapters of type HRA and LORA")


def _from_peft_key(key: str) -> str:
    key = key.removeprefix(PREFIX).replace(".base_layer.", ".")
    for old, new in (
        (".lora_A.weight", ".lora_A"),
        (".lora_B.weight", ".lora_B"),
        (".lora_embedding_A", ".lora_A"),
        (".lora_embedding_B", ".lora_B"),
    ):
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def load_peft_adapter(
    base_model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> AdapterModel:
    """Wrap ``base_model`` with an HRA or LoRA adapter saved by HF PEFT's ``save_pretrained``."""
    data = io.read_json(Path(path) / io.CONFIG_NAME)
    if "peft_type" not in data:
        raise io.AdapterLoadError(f"{path} is not a PEFT adapter (no peft_type); use AdapterModel.from_pretrained")
    config = config_from_peft(data, base_model)
    tensors = {_from_peft_key(k): v for k, v in io.load_tensors(path).items()}
    model = AdapterModel(base_model)
    model.add_adapter(adapter_name, config)
    params = model._adapter_params(adapter_name)
    for key, value in list(tensors.items()):  # PEFT stores Conv2d LoRA factors as 4-d kernels
        if key in params and value.shape != params[key].shape and value.numel() == params[key].numel():
            tensors[key] = value.reshape(params[key].shape)
    io.check_and_copy(params, tensors, path)
    model.trainable = is_trainable
    model.set_adapter(adapter_name)
    if not is_trainable:
        model.eval()
    return model


def save_peft_adapter(model: AdapterModel, folder: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write one adapter in PEFT's layout (config + safetensors) for ``peft.PeftModel.from_pretrained``."""
    config = model.peft_config[adapter_name]
    if not isinstance(config, (HRAConfig, LoraConfig)):
        raise NotImplementedError(f"HF PEFT has no {config.method} method; only HRA and LoRA adapters export to it")
    layers = {name: layer for name, layer in model._layers() if adapter_name in layer.adapters}
    if isinstance(config, HRAConfig) and len({layer.adapters[adapter_name].r for layer in layers.values()}) > 1:
        raise NotImplementedError("PEFT's HRAConfig has no rank_pattern; an HRA adapter with mixed ranks cannot export")
    tensors: dict[str, Tensor] = {}
    for key, value in model.adapter_state_dict(adapter_name).items():
        module, _, leaf = key.rpartition(".")
        layer = layers.get(module)
        if layer is None:  # modules_to_save copy, or a bias of a layer without this adapter
            tensors[PREFIX + key] = value
            continue
        kind = layer.view.kind
        if leaf == "bias":
            tensors[f"{PREFIX}{module}.base_layer.bias"] = value
        elif leaf in ("lora_A", "lora_B") and kind == "embedding":
            tensors[f"{PREFIX}{module}.lora_embedding_{leaf[-1]}"] = value
        elif leaf in ("lora_A", "lora_B"):
            if kind == "conv2d":
                kernel = layer.base_layer.weight.shape[1:] if leaf == "lora_A" else (1, 1)
                value = (
                    value.reshape(*value.shape, *kernel) if leaf == "lora_B" else value.reshape(value.shape[0], *kernel)
                )
            tensors[f"{PREFIX}{module}.{leaf}.weight"] = value
        else:
            tensors[f"{PREFIX}{key}"] = value
    io.save_tensors(Path(folder) / io.WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    io.atomic_write_json(Path(folder) / io.CONFIG_NAME, _peft_config(model, config, sorted(layers)))


def _peft_config(model: AdapterModel, config: AdapterConfig, targets: list[str]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "peft_type": "HRA" if isinstance(config, HRAConfig) else "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model.base_model, "config", None), "name_or_path", None),
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "target_modules": targets,  # exact names: PEFT matches them as PEFT would match ours
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": config.modules_to_save,
        "bias": config.bias,
    }
    if isinstance(config, HRAConfig):
        data.update(apply_GS=config.apply_GS, init_weights=True)
    else:
        data.update(
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            use_rslora=config.use_rslora,
            rank_pattern={t: config.rank_for(t) for t in targets if config.rank_for(t) != config.r},
            alpha_pattern={},
            fan_in_fan_out=False,
            init_lora_weights=True,
            use_dora=False,
        )
    return data
