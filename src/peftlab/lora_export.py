r"""Any exactly-linear peftlab adapter as a standard HF PEFT LoRA adapter (``AdapterModel.to_lora``).

Every method supplies ``Adapter.lora_factors(W)``: flat factors (A, B) with W' = W + B·A (scaling 1):

| method            | A (ρ × d_in)   | B (d_out × ρ)      | ρ    |
|-------------------|----------------|--------------------|------|
| LoRA              | A              | s·B                | r    |
| HRA               | T·Vᵀ           | −W·V               | r    |
| MTLoRA            | A              | s·B·T              | k·r  |
| HydraLoRA, fixed w| A              | s·Σ wᵢ·Bᵢ          | r    |

(HRA: W·H = W − (W·V)·T·Vᵀ with V the unit reflection vectors and T the compact-WY triangle; B is computed in
float64 from the base weight. HydraLoRA's router makes its update depend on the token, so it exports only with
fixed ``head_weights``.) Several adapters active together compose as the layer computes them (multiplicative
first, then additive, :mod:`peftlab.methods.base`): W' = W·H₁·H₂ + Δ₁ + Δ₂ is again W + B·A with the ranks
concatenated, A = [A₁; A₂; …], B = [B₁, B₂, …], where each multiplicative adapter's B uses the weight it sees
(W·H₁ for H₂). Factors are computed in float64 and written in float32.

The folder is PEFT's LoRA layout: ``adapter_config.json`` (``peft_type`` LORA, exact ``target_modules``,
``r`` = ``lora_alpha`` so the scaling is 1, ``rank_pattern`` = ``alpha_pattern`` where a layer's rank differs)
and ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (Conv2d:
A a convolution with the layer's kernel, stride and padding, B a 1×1 convolution; Embedding:
``lora_embedding_A`` / ``_B``). Trained biases and ``modules_to_save`` copies are carried as PEFT's LoRA
stores them (``bias`` = ``"all"`` / ``"lora_only"``, ``modules_to_save``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peftlab import files, peft_format
from peftlab.errors import MergeError, UnsupportedError
from peftlab.inject import AdapterLayer
from peftlab.methods.base import ADAPTERS

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what pipe.load_lora_weights(folder) reads
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraExport:
    """A PEFT LoRA adapter: its ``adapter_config.json`` and its tensors under PEFT's keys."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (atomically) to ``folder``."""
        folder = Path(folder)
        files.save_tensors(folder / files.WEIGHTS_NAME, self.tensors, metadata={"format": "pt"})
        files.atomic_write_json(folder / files.CONFIG_NAME, self.config)
        return folder


class LoraExporting:
    """The ``to_lora`` half of :class:`peftlab.AdapterModel` (a mixin: it reads the model's adapters)."""

    def to_lora(self, adapter_name: str | list[str] | None = None,
                save_directory: str | os.PathLike | None = None, **options: Any) -> LoraExport:
        """The adapter (default: the active adapters, composed as they run) as a standard HF PEFT LoRA adapter,
        written to ``save_directory`` if given: ``peft.PeftModel.from_pretrained(base, save_directory)``, vLLM,
        llama.cpp's ``convert_lora_to_gguf.py`` and lm-evaluation-harness read it (see the module docstring).

        ``options``: the methods' merge options; HydraLoRA needs ``head_weights`` (a fixed mixture of its
        heads), since with its router it is no LoRA. Raises :class:`UnsupportedError` naming the layer when an
        adapter or layer has no exact LoRA form.
        """
        names = self.active_adapters if adapter_name is None else (
            [adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        export = to_lora(self, names, options)
        if save_directory is not None:
            export.save(save_directory)
        return export


def layer_factors(layer: AdapterLayer, adapter_names: list[str], options: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(A, B) in float64, flat, with the composition of ``adapter_names`` on ``layer`` = W + B·A."""
    name, view = layer.layer_name, layer.view
    if layer.merged:
        raise MergeError(f"{name} has adapters {layer.merged} merged into its weight; call unmerge() before to_lora")
    module = layer.base_layer
    if view.kind == "conv2d" and (module.dilation != (1, 1) or module.padding_mode != "zeros"):
        raise UnsupportedError(
            f"cannot export {name} as LoRA: it is a Conv2d with dilation={module.dilation}, padding_mode="
            f"{module.padding_mode!r}, and PEFT's LoRA Conv2d keeps only kernel, stride and padding; exclude it")
    present = sorted((n for n in adapter_names if n in layer.adapters),
                     key=lambda n: not layer.adapters[n].multiplicative)  # W·H₁·H₂ first, then + Δ
    weight = view.flat_weight().detach().to(torch.float64)
    factors = []
    for adapter_name in present:
        adapter = layer.adapters[adapter_name]
        chosen = {k: v for k, v in options.items() if k in adapter.merge_options}
        try:
            a, b = adapter.lora_factors(weight, **chosen)
        except (UnsupportedError, MergeError) as error:
            raise type(error)(f"cannot export adapter {adapter_name!r} on {name} as LoRA: {error}") from None
        a, b = a.to(torch.float64), b.to(torch.float64)
        if adapter.multiplicative:
            weight = weight + b @ a  # the weight the next multiplicative adapter sees
        factors.append((a, b))
    return torch.cat([a for a, _ in factors]), torch.cat([b for _, b in factors], dim=1)


def _peft_bias(modes: list[str]) -> str:
    """PEFT's ``bias`` for peftlab's bias modes (``<method>_only`` trains the adapted layers' biases: ``lora_only``)."""
    if "all" in modes:
        return "all"
    return "lora_only" if any(m != "none" for m in modes) else "none"


def to_lora(model: LoraExporting, adapter_names: list[str], options: dict[str, Any]) -> LoraExport:
    """The adapters ``adapter_names``, composed as the model runs them together, as one PEFT LoRA adapter.

    ``options`` are the methods' merge options (HydraLoRA's ``head_weights``); others are refused.
    """
    unknown = [n for n in adapter_names if n not in model.peft_config]
    if unknown or not adapter_names:
        raise MergeError(f"no adapter named {unknown[0]!r}; adapters: {list(model.peft_config)}" if unknown else
                         "no adapter to export: name one (to_lora('default')) or activate one with set_adapter")
    accepted = {o for n in adapter_names for o in ADAPTERS[model.peft_config[n].method].merge_options}
    if set(options) - accepted:
        raise MergeError(f"export option(s) {sorted(set(options) - accepted)} are not used by adapter(s) "
                         f"{adapter_names}; options their methods take: {sorted(accepted) or 'none'}")
    model._check_loaded(adapter_names, "export")
    state: dict[str, Tensor] = {}
    layers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for layer_name, layer in model._layers():
        if not any(n in layer.adapters for n in adapter_names):
            continue
        a, b = layer_factors(layer, adapter_names, options)
        state[f"{layer_name}.lora_A"], state[f"{layer_name}.lora_B"] = a.float().contiguous(), b.float().contiguous()
        layers[layer_name] = (layer.view.kind, tuple(layer.base_layer.weight.shape))
    for adapter_name in adapter_names:  # trained biases and modules_to_save copies
        own = {f"{n}.{k}" for n, layer in model._layers() if adapter_name in layer.adapters
               for k in layer.adapters[adapter_name].state_dict()}
        state.update({k: v for k, v in model.adapter_state_dict(adapter_name).items() if k not in own})
    ranks = {n: state[f"{n}.lora_A"].shape[0] for n in layers}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {n: rank for n, rank in ranks.items() if rank != r}
    configs = [model.peft_config[n] for n in adapter_names]
    saved = sorted({m for c in configs for m in c.modules_to_save or []}) or None
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "revision": None,
        "base_model_name_or_path": getattr(getattr(model.base_model, "config", None), "name_or_path", None),
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False,
        "target_modules": sorted(layers), "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        "lora_dropout": 0.0, "bias": _peft_bias([c.bias for c in configs]), "modules_to_save": saved,
        "fan_in_fan_out": all(kind == "conv1d" for kind, _ in layers.values()), "init_lora_weights": True,
        "use_dora": False,
    }
    return LoraExport(config, peft_format.tensors_to_peft(state, layers))
