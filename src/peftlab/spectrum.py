r"""How much an adapter changes the spectrum of the weights it adapts (HRA's "keeps pre-training knowledge").

For an adapted layer with flat weight W (d_out × d_in, see :mod:`peftlab.layers`) and merged weight W', the
relative spectral change is

    δ = ‖σ(W') − σ(W)‖₂ / ‖σ(W)‖₂,

σ(·) the singular values in descending order. HRA's W' = W·H with H orthogonal has σ(W') = σ(W), so δ is
zero up to float rounding; an additive ΔW (LoRA and its variants) moves the singular values in general.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def singular_values(weight: Tensor) -> Tensor:
    """σ(W) in descending order, computed in float64."""
    return torch.linalg.svdvals(weight.detach().to(torch.float64))


def relative_spectral_change(before: Tensor, after: Tensor) -> float:
    """δ = ‖σ(after) − σ(before)‖₂ / ‖σ(before)‖₂ (0 for a zero ``before``)."""
    s0, s1 = singular_values(before), singular_values(after)
    norm = float(torch.linalg.vector_norm(s0))
    return float(torch.linalg.vector_norm(s1 - s0)) / norm if norm > 0 else 0.0


def spectral_changes(model: Any, adapter_names: list[str] | None = None, **merge_options: Any) -> dict[str, float]:
    """δ per adapted layer of an :class:`~peftlab.AdapterModel` when ``adapter_names`` (default: the active
    adapters) are merged; the model is left as it was (nothing merged). ``merge_options`` go to ``merge``
    (e.g. HydraLoRA's ``head_weights``)."""
    names = model.active_adapters if adapter_names is None else list(adapter_names)
    out: dict[str, float] = {}
    for layer_name, layer in model._layers():
        plan = layer.plan_merge({n: merge_options for n in names})
        if plan is not None:
            out[layer_name] = relative_spectral_change(layer.view.flat_weight(), plan[1])
    return out
