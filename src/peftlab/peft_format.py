"""HF PEFT's adapter format, as pure converters: config JSON ↔ peftlab config, tensor keys and layouts.

Nothing here touches a model: the functions take and return plain data (dicts of JSON values, dicts of
tensors, module names and layer kinds), so they are tested alone and :mod:`peftlab.model` calls them to
load (``AdapterModel.from_pretrained`` reads PEFT folders too) and save (``save_pretrained(format="peft")``).
Which methods PEFT has is each config's own knowledge (``peft_type``, ``from_peft``, ``to_peft``).

PEFT keys tensors ``base_model.model.<module>.<name>``; the tensors themselves are peftlab's up to layout:

| peftlab                      | PEFT                                                 |
|------------------------------|------------------------------------------------------|
| ``<m>.hra_u`` (d_in, r)      | ``<m>.hra_u``                                        |
| ``<m>.lora_A`` (r, d_in)     | ``<m>.lora_A.weight`` ((r, in, kh, kw) for Conv2d), ``<m>.lora_embedding_A`` |
| ``<m>.lora_B`` (d_out, r)    | ``<m>.lora_B.weight`` ((out, r, 1, 1) for Conv2d), ``<m>.lora_embedding_B`` |
| ``<m>.bias`` (trained bias)  | ``<m>.base_layer.bias`` on adapted layers            |
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import Tensor

from peftlab.config import AdapterConfig
from peftlab.errors import UnsupportedError
from peftlab.methods import peft_methods, registered_methods

PREFIX = "base_model.model."
SHARED_FIELDS = ("r", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
PEFT_ADDED_HEADS = ("classifier", "score")  # PEFT adds these to modules_to_save for task_type="SEQ_CLS"
_KEY_LAYOUT = ((".lora_A.weight", ".lora_A"), (".lora_B.weight", ".lora_B"),
               (".lora_embedding_A", ".lora_A"), (".lora_embedding_B", ".lora_B"))


def is_peft_config(data: dict[str, Any]) -> bool:
    """Whether an ``adapter_config.json`` was written by HF PEFT (it names ``peft_type``, not ``method``)."""
    return "peft_type" in data and "method" not in data


def config_from_peft(data: dict[str, Any], module_names: Collection[str]) -> AdapterConfig:
    """The peftlab config equivalent to a PEFT ``adapter_config.json``.

    ``module_names`` are the model's module names: ``modules_to_save`` entries that PEFT adds by itself
    (``classifier`` and ``score`` for ``task_type="SEQ_CLS"``) are kept only where the model has them, as
    PEFT does.
    """
    peft_type = data.get("peft_type")
    classes = [cls for cls in registered_methods().values() if cls.peft_type and cls.peft_type == peft_type]
    if not classes:
        raise UnsupportedError(
            f"peft_type={peft_type!r}: peftlab reads the PEFT adapters of its methods {peft_methods()} "
            f"(PEFT types {sorted(c.peft_type for c in registered_methods().values() if c.peft_type)})"
        )
    common = {k: data[k] for k in SHARED_FIELDS if data.get(k) is not None}
    saved = list(common.get("modules_to_save") or [])
    if data.get("task_type") == "SEQ_CLS":
        saved += list(PEFT_ADDED_HEADS)
    leaves = {name.rsplit(".", 1)[-1] for name in module_names} | set(module_names)
    saved = [m for m in dict.fromkeys(saved) if m not in PEFT_ADDED_HEADS or m in leaves]
    if saved or "modules_to_save" in common:
        common["modules_to_save"] = saved or None
    return classes[0].from_peft(data, common)


def peft_config(config: AdapterConfig, targets: list[str], base_model: str | None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for ``config`` adapted on exactly the modules ``targets``."""
    if not config.peft_type:
        raise UnsupportedError(
            f"HF PEFT has no {config.method} method; only {peft_methods()} adapters export to PEFT's format"
        )
    data: dict[str, Any] = {
        "peft_type": config.peft_type,
        "task_type": None,
        "base_model_name_or_path": base_model,
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
    data.update(config.to_peft(targets))
    return data


def key_from_peft(key: str) -> str:
    """PEFT's tensor key → peftlab's (``base_model.model.x.lora_A.weight`` → ``x.lora_A``)."""
    key = key.removeprefix(PREFIX).replace(".base_layer.", ".")
    for old, new in _KEY_LAYOUT:
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def tensors_from_peft(tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """PEFT's tensors under peftlab's keys, reshaped to ``shapes`` (peftlab key → shape) where PEFT stores
    a Conv2d factor as a 4-d kernel with the same number of elements."""
    out = {}
    for key, value in tensors.items():
        key = key_from_peft(key)
        shape = shapes.get(key)
        if shape is not None and tuple(value.shape) != tuple(shape) and value.numel() == _numel(shape):
            value = value.reshape(shape)
        out[key] = value
    return out


def tensors_to_peft(state: dict[str, Tensor], layers: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, Tensor]:
    """peftlab's tensors (``adapter_state_dict``) under PEFT's keys and layouts.

    ``layers`` maps each adapted module to ``(kind, weight shape)`` (kind as in :mod:`peftlab.layers`); keys of
    other modules (``modules_to_save`` copies, biases of layers without this adapter) only get the prefix.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module not in layers:
            out[PREFIX + key] = value
            continue
        kind, weight_shape = layers[module]
        if leaf == "bias":
            out[f"{PREFIX}{module}.base_layer.bias"] = value
        elif leaf in ("lora_A", "lora_B") and kind == "embedding":
            out[f"{PREFIX}{module}.lora_embedding_{leaf[-1]}"] = value
        elif leaf in ("lora_A", "lora_B"):
            if kind == "conv2d":  # A: (r, in, kh, kw) like the layer's kernel; B: a 1×1 convolution
                value = value.reshape(value.shape[0], *weight_shape[1:]) if leaf == "lora_A" else value.reshape(
                    *value.shape, 1, 1)
            out[f"{PREFIX}{module}.{leaf}.weight"] = value
        else:
            out[PREFIX + key] = value
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


__all__ = ["config_from_peft", "is_peft_config", "peft_config", "tensors_from_peft", "tensors_to_peft"]
