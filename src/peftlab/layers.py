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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import UnsupportedError

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
        w = module.weight
        if kind == "linear":
            self.d_out, self.d_in = w.shape
        elif kind == "conv1d":
            self.d_in, self.d_out = w.shape
        elif kind == "conv2d":
            self.d_out = w.shape[0]
            self.d_in = w[0].numel()
        else:
            self.d_in, self.d_out = w.shape

    # -- flat weight --------------------------------------------------------------------------------
    def flat_weight(self) -> Tensor:
        """W as (d_out, d_in); a view of the module's parameter, so it carries gradients."""
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
        """Overwrite the module's weight in place (used by merge/unmerge)."""
        w = self.module.weight
        w.copy_(self.to_native(flat).to(w.dtype))

    def forward_with_weight(self, x: Tensor, flat: Tensor) -> Tensor:
        """The layer's output with ``flat`` in place of its weight."""
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
