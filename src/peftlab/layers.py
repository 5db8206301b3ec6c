"""A uniform view of the layers peftlab can adapt.

Every supported layer is treated as a linear map on a flattened input of width ``d_in`` with a weight
``W`` of shape ``(d_out, d_in)`` (the "flat weight"):

| layer                         | native weight          | flat weight W            | d_in            |
|-------------------------------|------------------------|--------------------------|-----------------|
| ``nn.Linear``                 | (out, in)              | weight                   | in              |
| transformers ``Conv1D``       | (in, out)              | weightᵀ                  | in              |
| ``nn.Conv2d`` (groups = 1)    | (out, in, kh, kw)      | weight.view(out, -1)     | in·kh·kw        |
| ``nn.Embedding``              | (num, dim)             | weightᵀ (one-hot input)  | num_embeddings  |

Methods only ever see flat weights and these helpers, so one implementation serves all layer types:

- ``down(x, A)``: apply a flat matrix ``A`` (r, d_in) the way the layer applies its weight (a
  convolution with the layer's stride/padding/dilation for Conv2d, a lookup for Embedding) and return
  features with r in the last dimension.
- ``up(h, B)``: map (..., r) features through ``B`` (d_out, r) back to the layer's output layout.
- ``forward_with_weight(x, W)``: run the layer with a replacement flat weight (bias and geometry kept).

Quantized bases (QLoRA-style): a bitsandbytes ``Linear4bit`` (NF4/FP4) or ``Linear8bitLt`` (int8), or an
``nn.Linear`` whose weight is a quantized tensor subclass (torchao), is a ``"linear"`` layer whose widths come
from ``in_features`` / ``out_features`` (never from the packed weight's shape). Its flat weight is the
*dequantized* W (fp32, no gradient: a quantized weight is frozen); writing a flat weight requantizes it (as
HF PEFT's ``tuners/lora/bnb.py`` does), which rounds every entry to the nearest quantisation level:

- NF4 / FP4 (blocks of ``blocksize`` = 64 entries): |error| ≤ ½·(widest gap between two of the 16 levels)·
  absmax of the block: 0.152·absmax for NF4, 0.167·absmax for FP4;
- int8 (one scale per output row, ``SCB`` = row absmax): |error| ≤ absmax / 254 (plus the fp16 rounding of the
  copy bitsandbytes quantizes).

Methods never run a quantized layer with a replacement weight (:meth:`LayerView.forward_with_weight`
refuses): additive adapters add Δ(x) to the quantized layer's output, HRA feeds x·Hᵀ to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import MergeError, UnsupportedError

try:  # transformers is optional for the core
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

SUPPORTED_TYPES = "nn.Linear, transformers Conv1D, nn.Conv2d (groups=1), nn.Embedding"


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"`` or ``None`` if unsupported."""
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


# -- quantized weights -------------------------------------------------------------------------------------
ROUNDING = {  # how far requantizing moves one weight entry: half the widest gap between two levels
    "nf4": "up to 0.152 × the absmax of its block of 64 (NF4)",
    "fp4": "up to 0.167 × the absmax of its block of 64 (FP4)",
    "int8": "up to its output row's absmax / 254 (int8, quantized from an fp16 copy)",
}


def rounding_warning(kind: str, action: str) -> str:
    """The warning for merging into (``action="merge"``) or unmerging from a quantized weight, stating the rounding."""
    other = "the unmerged model's" if action == "merge" else "the base model's before the merge"
    return (f"{action.capitalize()} on a {kind}-quantized layer: its weight is dequantized, {action}d and requantized, "
            f"which moves each weight entry by {ROUNDING.get(kind, 'one quantisation step')}; the outputs differ "
            f"from {other} by that rounding")


def quantization(module: nn.Module) -> str | None:
    """How ``module``'s weight is quantized: ``"nf4"`` / ``"fp4"`` (bitsandbytes 4-bit), ``"int8"``
    (bitsandbytes 8-bit, once quantized), ``"subclass"`` (a torchao quantized tensor subclass), or ``None`` for
    a plain floating-point (or meta) weight."""
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        return None
    cls = type(w).__name__
    if cls == "Params4bit" and not w.is_floating_point():
        return str(w.quant_type)
    if cls == "Int8Params" and w.dtype == torch.int8:
        return "int8"
    if type(w).__module__.split(".")[0] == "torchao":  # e.g. AffineQuantizedTensor (not DTensor & co.)
        return "subclass"
    return None


def dequantized_weight(module: nn.Module, kind: str) -> Tensor:
    """The (d_out, d_in) fp32 weight a quantized ``module`` computes with (see the module docstring)."""
    w = module.weight
    if kind in ("nf4", "fp4"):
        import bitsandbytes.functional as bnbf

        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval forward for AVX512-BF16 kernels
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
        return bnbf.dequantize_4bit(data, state).float()
    if kind == "int8":
        import bitsandbytes.functional as bnbf

        scb = w.SCB if w.SCB is not None else module.state.SCB
        return bnbf.int8_vectorwise_dequant(w.data, scb).float()
    try:
        return w.dequantize().float()
    except (AttributeError, NotImplementedError, RuntimeError, TypeError) as e:
        raise UnsupportedError(
            f"the weight of this {type(module).__name__} is a {type(w).__name__}, a tensor subclass peftlab cannot "
            f"read ({type(e).__name__}: its .dequantize() failed); adapt a float or bitsandbytes-quantized model"
        ) from e


@torch.no_grad()
def requantize(module: nn.Module, kind: str, flat: Tensor) -> None:
    """Replace a quantized ``module``'s weight by ``flat`` (d_out, d_in), quantized like the old weight."""
    import bitsandbytes as bnb

    w = module.weight
    if kind in ("nf4", "fp4"):
        options = {k: v for k, v in w.__dict__.items() if not k.startswith("_") and k != "data"}
        options.update(bnb_quantized=False, requires_grad=False)
        data = flat.to("cpu", w.quant_state.dtype)
        module.weight = bnb.nn.Params4bit(data, **options).to(w.device)
        return
    if kind == "int8":
        module.weight = bnb.nn.Int8Params(flat.to("cpu"), requires_grad=False,
                                          has_fp16_weights=w.has_fp16_weights).to(w.device)
        module.state.reset_grads()
        return
    raise MergeError(
        f"cannot write a merged weight into {type(module).__name__}'s {type(w).__name__} weight (a quantized tensor "
        "subclass peftlab cannot requantize); merge on the full-precision base model instead"
    )


class LayerView:
    """Flat-weight access and the down/up projections for one base layer (see module docstring)."""

    def __init__(self, module: nn.Module, name: str = "") -> None:
        kind = layer_kind(module)
        if kind is None:
            raise TypeError(
                f"module {name or '?'} is a {type(module).__name__}, which peftlab cannot adapt; "
                f"supported layer types: {SUPPORTED_TYPES}"
            )
        if kind == "conv2d" and module.groups != 1:
            raise UnsupportedError(
                f"{name or 'Conv2d'} has groups={module.groups}; adapters on grouped or depthwise "
                "convolutions are not supported. Exclude this module (exclude_modules=[...])."
            )
        self.module = module
        self.kind = kind
        self.name = name
        self.quantized = quantization(module)  # see the module docstring
        w = module.weight
        if kind == "linear":  # in_features, not weight.shape: a 4-bit weight is packed (numel/2, 1)
            self.d_out, self.d_in = module.out_features, module.in_features
        elif kind == "conv1d":
            self.d_in, self.d_out = w.shape
        elif kind == "conv2d":
            self.d_out = w.shape[0]
            self.d_in = w[0].numel()
        else:
            self.d_in, self.d_out = w.shape

    # -- flat weight --------------------------------------------------------------------------------
    def flat_weight(self) -> Tensor:
        """W as (d_out, d_in); a view of the module's parameter, so it carries gradients (a quantized layer: the
        dequantized weight, fp32, without gradient)."""
        if self.quantized:
            return dequantized_weight(self.module, self.quantized)
        w = self.module.weight
        if self.kind in ("conv1d", "embedding"):
            return w.t()
        if self.kind == "conv2d":
            return w.reshape(self.d_out, self.d_in)
        return w

    def to_native(self, flat: Tensor) -> Tensor:
        """A flat (d_out, d_in) matrix in the module's own weight layout."""
        if self.kind in ("conv1d", "embedding"):
            return flat.t()
        if self.kind == "conv2d":
            return flat.reshape(self.module.weight.shape)
        return flat

    @torch.no_grad()
    def write_flat_weight(self, flat: Tensor) -> None:
        """Overwrite the module's weight in place (used by merge/unmerge); a quantized weight is requantized."""
        if self.quantized:
            requantize(self.module, self.quantized, flat)
            return
        w = self.module.weight
        w.copy_(self.to_native(flat).to(w.dtype))

    def forward_with_weight(self, x: Tensor, flat: Tensor) -> Tensor:
        """The layer's output with ``flat`` in place of its weight (not for quantized layers)."""
        if self.quantized:
            raise UnsupportedError(f"{self.name or 'this layer'} is quantized ({self.quantized}); it runs only with "
                                   "its own weight (adapters act on its input or add to its output)")
        m = self.module
        w = self.to_native(flat)
        if self.kind == "linear":
            return F.linear(x, w, m.bias)
        if self.kind == "conv1d":
            y = x @ w
            return y + m.bias if m.bias is not None else y
        if self.kind == "conv2d":
            return m._conv_forward(x, w, m.bias)
        return F.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)

    # -- low-rank projections -------------------------------------------------------------------------
    def down(self, x: Tensor, a: Tensor) -> Tensor:
        """x ↦ features (..., r): the layer's input map with weight ``a`` (r, d_in)."""
        if self.kind in ("linear", "conv1d"):
            return x @ a.t()
        if self.kind == "conv2d":
            kernel = a.reshape(a.shape[0], *self.module.weight.shape[1:])
            return self.module._conv_forward(x, kernel, None).movedim(1, -1)
        return F.embedding(x, a.t(), self.module.padding_idx)

    def up(self, h: Tensor, b: Tensor) -> Tensor:
        """features (..., r) ↦ output-shaped tensor through ``b`` (d_out, r)."""
        y = h @ b.t()
        return y.movedim(-1, 1) if self.kind == "conv2d" else y

    def num_tokens(self, x: Tensor) -> int:
        """How many input vectors the layer maps (N in the cost model)."""
        if self.kind == "conv2d":
            return x.shape[0] * x.shape[-2] * x.shape[-1]
        if self.kind == "embedding":
            return x.numel()
        return x.numel() // self.d_in


# Head modules as transformers names them: a sequence-classification head (trained in full next to an
# adapter), and every output head (never adapted by target_modules="all-linear").
CLASSIFIER_HEADS = ("pre_classifier", "classifier", "score")
OUTPUT_HEADS = (*CLASSIFIER_HEADS, "lm_head", "qa_outputs")
