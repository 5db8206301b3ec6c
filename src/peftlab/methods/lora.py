r"""LoRA: Low-Rank Adaptation (Hu et al., ICLR 2022), the baseline every method is compared with.

    y = W·x + b + s·B·A·dropout(x),   s = α / r   (α / √r with ``use_rslora``)

A (r × d_in) is Kaiming-uniform (a = √5) and B (d_out × r) is zero, so ΔW = s·B·A = 0 at the start:
the same math and init as HF PEFT's default LoRA. On Conv2d, A acts as a convolution with the layer's
kernel geometry and B as a 1×1 convolution; on Embedding, A is a lookup table (PEFT's layout: A = 0,
B ~ N(0, 1)). Merge: W ← W + s·B·A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftlab.batched import LowRank
from peftlab.config import AdapterConfig, check_finite, check_probability, register_method
from peftlab.errors import UnsupportedError
from peftlab.layers import LayerView
from peftlab.methods.base import Adapter

PEFT_UNSUPPORTED = {  # PEFT LoRA options peftlab does not implement: loading such an adapter is refused
    "use_dora": "DoRA",
    "lora_bias": "a LoRA bias on B",
    "layer_replication": "layer replication",
    "alpha_pattern": "per-module alpha (alpha_pattern)",
    "target_parameters": "target_parameters",
}


@register_method
@dataclass
class LoraConfig(AdapterConfig):
    """Config for LoRA.

    Args:
        alpha: scaling numerator; the update is scaled by alpha / r.
        dropout: dropout on the adapter's input (training only).
        use_rslora: scale by alpha / √r (rank-stabilised LoRA).
        init_weights: ``True``: B = 0 (ΔW = 0 at start); ``False``: B random too (for tests).
    """

    method: ClassVar[str] = "lora"
    description: ClassVar[str] = "LoRA, W + (α/r)·B·A"
    default_lr: ClassVar[float] = 3e-3
    peft_type: ClassVar[str | None] = "LORA"
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        check_finite("alpha", self.alpha)
        check_probability("dropout", self.dropout)

    @classmethod
    def from_peft(cls, data: dict[str, Any], common: dict[str, Any]) -> LoraConfig:
        for key, what in PEFT_UNSUPPORTED.items():
            if data.get(key):
                raise UnsupportedError(f"this PEFT LoRA adapter uses {what} ({key}), which peftlab does not support")
        return cls(alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                   use_rslora=bool(data.get("use_rslora", False)), rank_pattern=data.get("rank_pattern") or {},
                   bias=data.get("bias", "none"), **common)

    def to_peft(self, targets: list[str]) -> dict[str, Any]:
        return {"lora_alpha": self.alpha, "lora_dropout": self.dropout, "use_rslora": self.use_rslora,
                "rank_pattern": {t: self.rank_for(t) for t in targets if self.rank_for(t) != self.r},
                "alpha_pattern": {}, "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False}

    def scaling(self, r: int) -> float:
        return self.alpha / math.sqrt(r) if self.use_rslora else self.alpha / r


def low_rank_init(a: Tensor, b: Tensor, zero_b: bool, embedding: bool = False) -> None:
    """Kaiming-uniform A and zero B (PEFT's default); for Embedding, A = 0 and B ~ N(0, 1)."""
    with torch.no_grad():
        if embedding:
            nn.init.zeros_(a) if zero_b else nn.init.normal_(a)
            nn.init.normal_(b)
            return
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if zero_b:
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))


class LoraAdapter(Adapter):
    """LoRA on one layer: ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r)."""

    config_class = LoraConfig
    supported_kinds = ("linear", "conv1d", "conv2d", "embedding")

    def __init__(self, layer: LayerView, config: LoraConfig, r: int) -> None:
        super().__init__(layer, config, r)
        self.scaling = config.scaling(r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, layer.d_in))
        self.lora_B = nn.Parameter(torch.empty(layer.d_out, r))
        low_rank_init(self.lora_A, self.lora_B, config.init_weights, embedding=layer.kind == "embedding")

    @classmethod
    def low_rank_factors(cls, state: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        return {"A": [state["lora_A"]], "B": [state["lora_B"]]} if "lora_A" in state else {}

    def delta(self, x: Tensor, layer: LayerView) -> Tensor:
        if x.is_floating_point():
            x = self.dropout(x.to(self.lora_A.dtype))
        return layer.up(layer.down(x, self.lora_A) * self.scaling, self.lora_B)  # s scales the r-wide features

    def batched_term(self, layer: LayerView) -> LowRank | None:
        """Δ(x) = (x·Aᵀ)·(s·B)ᵀ for mixed-adapter batches, on Linear and Conv1D layers (others: grouped rows)."""
        return LowRank(self.lora_A, self.scaling * self.lora_B) if layer.kind in ("linear", "conv1d") else None

    def delta_weight(self) -> Tensor:
        """ΔW = s·B·A, flat (d_out, d_in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def lora_factors(self, weight: Tensor, **options: Any) -> tuple[Tensor, Tensor]:
        """(A, s·B): the scaling s (α/r or α/√r) is folded into B."""
        return self.lora_A.detach().to(weight.dtype), self.scaling * self.lora_B.detach().to(weight.dtype)

    def merged_weight(self, weight: Tensor, **options: Any) -> Tensor:
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: Tensor, **options: Any) -> Tensor:
        return weight - self.delta_weight().to(weight.dtype)
