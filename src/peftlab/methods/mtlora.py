r"""MTLoRA: Matrix-Transformation based LoRA (Liang et al., arXiv 2403.07440).

LoRA with a learned r × r transformation T between the down- and up-projection:

    y = W·x + b + s·B·T·A·dropout(x),   s = α / r,   A (r × d_in), B (d_out × r), T (r × r)

T is built from trainable ``transform_C`` = C (and ``transform_D`` = D), each r × r:

| structure | T      | extra parameters |
|-----------|--------|------------------|
| ``shim``  | C      | r²               |
| ``icfm``  | C·Cᵀ   | r² (T is symmetric positive semi-definite) |
| ``ctcm``  | C·D    | 2r²              |
| ``dtsm``  | C + D  | 2r²              |

The forward runs x → A → T → B (ΔW = s·B·T·A is only built when merging: W ← W ± ΔW in the flat layout of
:mod:`peftlab.layers`, so Linear, Conv1D, Conv2d and Embedding all merge and unmerge exactly). Dropout acts
on float inputs in training only (never on Embedding's token ids). T = I is exactly LoRA.

Initialisation (ΔW = 0 at the start for both, and neither is a zero-gradient point):

- ``init="reference"`` (the released code): A, C, D Kaiming-uniform (a = √5), B = 0; T is random.
- ``init="identity"`` (the authors' current advice): T = I, i.e. C = I (shim, icfm), C = D = I (ctcm),
  C = I and D = 0 (dtsm); A Kaiming-uniform, B = 0. At the first step only B gets a gradient.

The released PEFT port initialises C = D = 0 for icfm/ctcm, where every gradient stays exactly zero;
that is never done here. (Also fixed: its icfm Embedding computed Cᵀ·C in the forward but C·Cᵀ when
merging; its Conv2d and GPT-2 MLP layers could not merge; one layer type kept dropout on in eval.)

Fused projections. GPT-2's ``c_attn`` is one Conv1D computing q|k|v (k = 3 equal output slices). As in
loralib's ``MergedLinear`` (which the reference builds on), the adapter then has A (k·r × d_in) and a
block-diagonal B = diag(B₁ … B_k), stored compactly as ``lora_B`` (d_out × r) with B_j (d_out/k × r) the
rows of slice j, so slice j's output reads only the r-block j of T·A·x. T is either

- ``fused="dense"``: one (k·r × k·r) T, as in the paper's code (q, k, v updates mix subspaces), or
- ``fused="per_slice"``: one r × r T_j per slice, i.e. T = diag(T₁ … T_k) (``transform_C`` (k, r, r)).

``fused_slices`` sets k: an int for every targeted layer, ``{name suffix or regex: k}`` per module, or
``None`` to detect: a Conv1D named ``c_attn`` whose d_out is 3·d_in (GPT-2 self-attention q|k|v) or
2·d_in (GPT-2 cross-attention k|v) gets k = d_out / d_in, every other layer k = 1. (The model type,
e.g. ``config.model_type == "gpt2"``, is not visible from a layer, hence the name-and-shape rule.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftlab import matching
from peftlab.batched import LowRank
from peftlab.config import (
    AdapterConfig,
    check_nonnegative,
    check_positive_int,
    check_probability,
    register_method,
)
from peftlab.errors import ConfigError
from peftlab.layers import LayerView
from peftlab.methods.base import Adapter

STRUCTURES = ("shim", "icfm", "ctcm", "dtsm")
INITS = ("reference", "identity")
FUSED_MODES = ("dense", "per_slice")
FUSED_NAMES = ("c_attn",)  # GPT-2's q|k|v (and cross-attention k|v) projection
SLICES_HINT = "(the number of equal output slices)"


@register_method
@dataclass
class MTLoraConfig(AdapterConfig):
    """Config for MTLoRA (see the module docstring for the math).

    Args:
        r: rank per slice (A has k·r rows on a layer fused from k projections).
        alpha: scaling numerator; the update is scaled by s = alpha / r.
        dropout: dropout on the adapter's input (training only, float inputs only).
        structure: how T is built from C (and D): ``"shim"`` C, ``"icfm"`` C·Cᵀ, ``"ctcm"`` C·D,
            ``"dtsm"`` C + D.
        init: ``"reference"`` (A, C, D Kaiming-uniform, B = 0) or ``"identity"`` (T = I, A Kaiming, B = 0).
        fused: on fused projections, ``"dense"`` (one k·r × k·r T) or ``"per_slice"`` (one r × r T per slice).
        fused_slices: k, the number of equal output slices of a fused projection: an int (every targeted
            layer), a dict ``{module suffix or regex: k}`` (others 1), or ``None`` (GPT-2 ``c_attn`` detected).
    """

    method: ClassVar[str] = "mtlora"
    description: ClassVar[str] = "MTLoRA, W + s·B·T·A (T from C, D by structure)"
    default_lr: ClassVar[float] = 3e-3
    cli_fields: ClassVar[tuple[str, ...]] = ("structure",)
    variants: ClassVar[dict[str, dict[str, Any]]] = {
        f"mtlora-{s}": {"structure": s} for s in ("shim", "icfm", "ctcm", "dtsm")
    }
    alpha: float = 16.0
    dropout: float = 0.0
    structure: str = field(default="shim", metadata={
        "help": "MTLoRA's transformation T: shim C, icfm C·Cᵀ, ctcm C·D, dtsm C + D", "choices": STRUCTURES})
    init: str = "reference"
    fused: str = "dense"
    fused_slices: int | dict[str, int] | None = None

    def validate(self) -> None:
        super().validate()
        check_nonnegative("alpha", self.alpha)
        check_probability("dropout", self.dropout)
        if self.structure not in STRUCTURES:
            raise ConfigError(f"structure={self.structure!r} is not an MTLoRA structure; use one of {list(STRUCTURES)}")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r}; use one of {list(INITS)}")
        if self.fused not in FUSED_MODES:
            raise ConfigError(f"fused={self.fused!r}; use one of {list(FUSED_MODES)}")
        if isinstance(self.fused_slices, dict):
            for key, value in self.fused_slices.items():
                if not isinstance(key, str) or not key:
                    raise ConfigError(f"fused_slices keys must be module-name suffixes or regexes; got {key!r}")
                matching.check_pattern(key, "fused_slices")
                check_positive_int(f"fused_slices[{key!r}]", value, SLICES_HINT)
        elif self.fused_slices is not None:
            check_positive_int("fused_slices", self.fused_slices, SLICES_HINT)

    def scaling(self, r: int) -> float:
        return self.alpha / r


# -- the math, as pure functions ------------------------------------------------------------------------
def transformation(c: Tensor, d: Tensor | None, structure: str) -> Tensor:
    """T from C (and D), batched over leading dims: C (shim), C·Cᵀ (icfm), C·D (ctcm), C + D (dtsm)."""
    if structure == "shim":
        return c
    if structure == "icfm":
        return c @ c.mT
    if structure in ("ctcm", "dtsm"):
        if d is None:
            raise ValueError(f"structure {structure!r} needs D")
        return c @ d if structure == "ctcm" else c + d
    raise ValueError(f"unknown MTLoRA structure {structure!r}; use one of {list(STRUCTURES)}")


def fused_slices_for(layer: LayerView, fused_slices: int | dict[str, int] | None) -> int:
    """k, the number of equal output slices the adapter treats ``layer`` as (see the module docstring)."""
    if isinstance(fused_slices, int):
        return fused_slices
    name = layer.name
    if isinstance(fused_slices, dict):
        key = matching.first_match(name, fused_slices, "fused_slices")
        return 1 if key is None else fused_slices[key]
    fused_width = layer.d_out in (2 * layer.d_in, 3 * layer.d_in)
    if name.rsplit(".", 1)[-1] in FUSED_NAMES and layer.kind == "conv1d" and fused_width:
        return layer.d_out // layer.d_in
    return 1


def init_mtlora(a: Tensor, b: Tensor, c: Tensor, d: Tensor | None, structure: str, init: str) -> None:
    """A Kaiming-uniform (a = √5), B = 0; C, D Kaiming-uniform per r × r block (reference) or T = I (identity)."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)
        for m, identity in ((c, True), (d, structure == "ctcm")):
            if m is None:
                continue
            for block in m.view(-1, m.shape[-2], m.shape[-1]):
                if init == "reference":
                    nn.init.kaiming_uniform_(block, a=math.sqrt(5))
                elif identity:
                    block.copy_(torch.eye(block.shape[0]))
                else:  # dtsm's D: T = I + 0
                    block.zero_()


# -- the adapter ---------------------------------------------------------------------------------------------
class MTLoraAdapter(Adapter):
    """MTLoRA on one layer: ``lora_A`` (k·r, d_in), ``lora_B`` (d_out, r), ``transform_C`` (and ``transform_D``).

    ``transform_C``/``transform_D`` are (r, r) on plain layers (k = 1), (k·r, k·r) on fused layers with
    ``fused="dense"`` and (k, r, r) with ``fused="per_slice"``.
    """

    config_class = MTLoraConfig
    supported_kinds = ("linear", "conv1d", "conv2d", "embedding")

    @classmethod
    def check_layer(cls, layer: LayerView, r: int, config: MTLoraConfig) -> str | None:
        k = fused_slices_for(layer, config.fused_slices)
        if k > 1 and (layer.kind not in ("linear", "conv1d") or layer.d_out % k):
            return (
                f"fused_slices={k} needs a Linear or Conv1D whose output width divides into {k} equal slices, "
                f"not a {layer.kind} with d_out={layer.d_out}. fused_slices as an int applies to every targeted "
                "layer; use a dict ({'c_attn': 3}) or None (detects GPT-2's c_attn)."
            )
        return super().check_layer(layer, r, config)

    def __init__(self, layer: LayerView, config: MTLoraConfig, r: int) -> None:
        super().__init__(layer, config, r)
        k = fused_slices_for(layer, config.fused_slices)
        self.structure = config.structure
        self.slices = k
        self.per_slice = k > 1 and config.fused == "per_slice"
        self.scaling = config.scaling(r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        t_shape = (k, r, r) if self.per_slice else (k * r, k * r)
        self.lora_A = nn.Parameter(torch.empty(k * r, layer.d_in))
        self.lora_B = nn.Parameter(torch.empty(layer.d_out, r))
        self.transform_C = nn.Parameter(torch.empty(t_shape))
        self.transform_D = nn.Parameter(torch.empty(t_shape)) if config.structure in ("ctcm", "dtsm") else None
        init_mtlora(self.lora_A, self.lora_B, self.transform_C, self.transform_D, config.structure, config.init)

    @classmethod
    def low_rank_factors(cls, state: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        """A, B and the transform's trainable tensors C (and D) as saved."""
        if "lora_A" not in state:
            return {}
        names = ("lora_A", "lora_B", "transform_C", "transform_D")
        return {name.removeprefix("lora_"): [state[name]] for name in names if name in state}

    def transform(self) -> Tensor:
        """T: (k·r, k·r), or (k, r, r) per slice."""
        return transformation(self.transform_C, self.transform_D, self.structure)

    def delta(self, x: Tensor, layer: LayerView) -> Tensor:
        if x.is_floating_point():
            x = self.dropout(x.to(self.lora_A.dtype))
        h = layer.down(x, self.lora_A)  # A·x, (..., k·r)
        t = self.transform()
        if self.per_slice:  # T_j on each r-block
            h = torch.einsum("...js,jrs->...jr", h.unflatten(-1, (self.slices, self.r)), t).flatten(-2)
        else:
            h = h @ t.mT
        h = h * self.scaling  # s scales the r-wide features, not the d_out-wide output
        if self.slices == 1:
            return layer.up(h, self.lora_B)
        b = self.lora_B.view(self.slices, -1, self.r)  # B_j, (d_out/k, r)
        return torch.einsum("...jr,jor->...jo", h.unflatten(-1, (self.slices, self.r)), b).flatten(-2)

    def batched_term(self, layer: LayerView) -> LowRank | None:
        """Δ(x) = (x·Aᵀ)·(s·B·T)ᵀ for mixed-adapter batches (T folded into B by :meth:`up_factor`), on Linear and
        Conv1D layers (others: grouped rows)."""
        if layer.kind not in ("linear", "conv1d"):
            return None
        return LowRank(self.lora_A, self.up_factor())

    def up_factor(self, dtype: torch.dtype | None = None) -> Tensor:
        """s·B·T (d_out, k·r), with B and (per slice) T block-diagonal on fused layers: ΔW = s·B·T·A.
        ``dtype``: computed in that dtype (default: the parameters')."""
        b, c, d = (p if p is None or dtype is None else p.to(dtype)
                   for p in (self.lora_B, self.transform_C, self.transform_D))
        t = transformation(c, d, self.structure)
        if self.per_slice:
            t = torch.block_diag(*t)
        if self.slices > 1:
            b = torch.block_diag(*b.view(self.slices, -1, self.r))
        return self.scaling * (b @ t)

    def delta_weight(self) -> Tensor:
        """ΔW = s·B·T·A, flat (d_out, d_in)."""
        return self.up_factor() @ self.lora_A

    def lora_factors(self, weight: Tensor, **options: Any) -> tuple[Tensor, Tensor]:
        """(A, s·B·T): a LoRA with B' = s·B·T, of rank k·r on a fused layer (T mixes the slices' subspaces)."""
        with torch.no_grad():
            return self.lora_A.to(weight.dtype), self.up_factor(weight.dtype)

    def merged_weight(self, weight: Tensor, **options: Any) -> Tensor:
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: Tensor, **options: Any) -> Tensor:
        return weight - self.delta_weight().to(weight.dtype)
