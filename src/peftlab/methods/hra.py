r"""HRA: Householder Reflection Adaptation (Yuan et al., NeurIPS 2024, arXiv 2405.17484).

The frozen weight W (d_out × d_in) is multiplied on the input side by a chain of r reflections:

    W' = W·H,   H = H₁H₂⋯H_r,   H_i = I − 2·û_i·û_iᵀ,   û_i = u_i / ‖u_i‖          (paper Eq. 2)

with trainable U = [u₁ … u_r] of shape (d_in, r) (PEFT's ``hra_u``). H is orthogonal, so W' keeps the
singular values of W. In the compact WY form (paper Eq. 3-5) H = I − V·T·Vᵀ with V = Û and T the
r × r upper-triangular matrix with T⁻¹ = ½·I + strict_upper(VᵀV). The layer therefore never builds a
d_in × d_in matrix:

    forward   y = (x·Hᵀ)·Wᵀ + b,   x·Hᵀ = x − ((x·V)·Tᵀ)·Vᵀ        ≈ 4·N·d_in·r extra FLOPs, like LoRA
      or      y = x·Wᵀ + b − ((x·V)·Tᵀ)·(W·V)ᵀ                      (training: no N·d² term in backward)
    merge     W ← W − ((W·V)·T)·Vᵀ                                 O(d_out·d_in·r)
    unmerge   W ← W·Hᵀ = W − ((W·V)·Tᵀ)·Vᵀ                          (H⁻¹ = Hᵀ)
    as LoRA   W·H = W + B·A,  A = T·Vᵀ (r × d_in),  B = −W·V (d_out × r),  scaling 1   (export --format lora)

T is built in fp32 (fp64 for fp64 models) whatever the model's dtype.

Variants: ``apply_GS=True`` (λ = ∞) replaces Û by an orthonormal Q from a QR decomposition, so
H = I − 2·Q·Qᵀ (T = 2·I); ``orthogonality_weight`` = λ > 0 adds λ·‖I − ÛᵀÛ‖²_F per layer to the loss
(paper Eq. 6). Initialisation (``init_weights=True``, even r): r/2 Kaiming-uniform columns, each
repeated twice; equal neighbours cancel (H₂ₖH₂ₖ₊₁ = I), so H = I and the model starts as the base model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.batched import Reflections
from peftlab.config import AdapterConfig, check_nonnegative, register_method
from peftlab.errors import ConfigError, UnsupportedError
from peftlab.layers import LayerView
from peftlab.methods.base import Adapter

FORWARD_PATHS = ("auto", "activation", "weight", "lowrank")


@register_method
@dataclass
class HRAConfig(AdapterConfig):
    """Config for HRA (see the module docstring for the math).

    Args:
        r: number of Householder reflections per layer (even r allows the identity init).
        apply_GS: orthonormalise U (λ = ∞ in the paper); H cannot start as the identity then.
        init_weights: symmetric init so that H = I at the start; ``False`` gives Kaiming-uniform U.
        orthogonality_weight: λ of the regulariser λ·Σ‖I − ÛᵀÛ‖²_F (paper range 1e-5 … 1e-3).
        forward_path: ``"activation"`` (x ↦ x·Hᵀ, then the base layer), ``"weight"`` (run the base
            layer with W·H), ``"lowrank"`` (base(x) − ((x·V)·Tᵀ)·(W·V)ᵀ) or ``"auto"``: the weight path
            for Conv2d. In training, the activation path when the input requires grad (the base layer's
            input gradient ḡ·W, which the activation path needs, is computed anyway, so the adapter costs
            what LoRA costs); otherwise the low-rank path (4·d_out·d_in·r extra FLOPs for W·V and its
            gradient, instead of the 2·N·d_out·d_in input gradient) unless the batch has at most 2r
            tokens. In inference, the weight path when the batch has more tokens than the layer has
            outputs, else the activation path. A quantized layer (bitsandbytes 4/8-bit) always takes the
            activation path, whatever this says: it runs only with its own weight.
    """

    method: ClassVar[str] = "hra"
    description: ClassVar[str] = "Householder reflections W·H (HRA paper lr 3e-3…1e-2)"
    default_lr: ClassVar[float] = 1e-2  # the better of 3e-3 / 1e-2 on MiniLM + movie-snippets
    peft_type: ClassVar[str | None] = "HRA"
    apply_GS: bool = False
    init_weights: bool = True
    orthogonality_weight: float = 0.0
    forward_path: str = "auto"

    @classmethod
    def from_peft(cls, data: dict[str, Any], common: dict[str, Any]) -> HRAConfig:
        return cls(apply_GS=bool(data.get("apply_GS", False)), bias=data.get("bias", "none"), **common)

    def to_peft(self, targets: list[str]) -> dict[str, Any]:
        if len({self.rank_for(t) for t in targets}) > 1:
            raise UnsupportedError("PEFT's HRAConfig has no rank_pattern; an HRA adapter with mixed ranks "
                                      "cannot export")
        return {"apply_GS": self.apply_GS, "init_weights": True}

    def validate(self) -> None:
        super().validate()
        check_nonnegative("orthogonality_weight", self.orthogonality_weight)
        if self.forward_path not in FORWARD_PATHS:
            raise ConfigError(f"forward_path={self.forward_path!r}; use one of {list(FORWARD_PATHS)}")


# -- the math, as pure functions ------------------------------------------------------------------------
def normalized_columns(u: Tensor) -> Tensor:
    """Û = U / ‖U‖ column-wise; a zero column stays zero (its reflection is then the identity)."""
    return u / u.norm(dim=0, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)


def orthonormal_columns(u: Tensor) -> Tensor:
    """Gram-Schmidt of U's columns through a QR decomposition, NaN-free also for rank-deficient U.

    A column that depends on the previous ones (e.g. the paired columns of the symmetric init) gets a
    small nudge (10⁻³ of the largest column norm) along its own QR direction before the final QR, so the
    result and its gradient stay finite. Q·Qᵀ does not depend on the signs QR picks.
    """
    q, r = torch.linalg.qr(u)
    scale = u.norm(dim=0).max().clamp_min(torch.finfo(u.dtype).tiny)
    deficient = r.diagonal().abs() <= 1e-5 * scale
    if bool(deficient.any()):
        q, _ = torch.linalg.qr(u + 1e-3 * scale * q.detach() * deficient)
    return q


def householder_wy(v: Tensor) -> Tensor:
    """T of the compact WY form: H₁⋯H_r = I − V·T·Vᵀ for unit columns V, T⁻¹ = ½I + strict_upper(VᵀV)."""
    r = v.shape[1]
    eye = torch.eye(r, dtype=v.dtype, device=v.device)
    t_inv = 0.5 * eye + torch.triu(v.t() @ v, diagonal=1)
    return torch.linalg.solve_triangular(t_inv, eye, upper=True)


def apply_reflections(x: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x·Hᵀ = x − ((x·V)·Tᵀ)·Vᵀ for x of shape (..., d_in)."""
    return x - ((x @ v) @ t.t()) @ v.t()


def reflect_weight(w: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """W·H = W − ((W·V)·T)·Vᵀ."""
    return w - ((w @ v) @ t) @ v.t()


class _WYFactors(torch.autograd.Function):
    """(Vᵀ, T) of the compact WY form from U, with a hand-written backward.

    Every training forward of every HRA layer starts here. Autograd would record some twenty small ops
    (norms, triu, a triangular solve, their backward nodes) whose fixed cost rivals the GEMMs of a small
    layer; this backward does the same math in a handful of ops:

        T = S⁻¹                          ḡ_S = −Tᵀ·ḡ_T·Tᵀ
        S = ½I + strict_upper(VᵀV)       ḡ_V += V·(G + Gᵀ),  G = strict_upper(ḡ_S)
        V = U / ‖U‖ (columns)            ḡ_U = (ḡ_V − V·diag(Vᵀ·ḡ_V)) / ‖U‖
    """

    @staticmethod
    def forward(ctx, u: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        norms = u.norm(dim=0).clamp_min(torch.finfo(u.dtype).tiny)
        v = u / norms
        t = householder_wy(v)
        ctx.save_for_backward(v, norms, t)
        return v.t().contiguous(), t  # Vᵀ (r, d_in): the layout F.linear wants

    @staticmethod
    def backward(ctx, g_vt: Tensor | None, g_t: Tensor | None) -> Tensor:  # type: ignore[override]
        v, norms, t = ctx.saved_tensors
        g_v = torch.zeros_like(v) if g_vt is None else g_vt.t()
        if g_t is not None:
            g = torch.triu(-(t.t() @ g_t @ t.t()), diagonal=1)
            g_v = g_v + v @ (g + g.t())
        return (g_v - v * (v * g_v).sum(0)) / norms


def wy_factors(u: Tensor) -> tuple[Tensor, Tensor]:
    """(Vᵀ, T) with H₁⋯H_r = I − V·T·Vᵀ, V = U / ‖U‖ column-wise; the same values as
    ``normalized_columns`` and ``householder_wy``, differentiable in U through a hand-written backward."""
    return _WYFactors.apply(u)


def lowrank_factors(vt: Tensor, t: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(A, B) with x·(W·H)ᵀ = x·Wᵀ + (x·Aᵀ)·Bᵀ: A = Vᵀ (r, d_in), B = −W·V·T (d_out, r), in V's dtype.

    (W·V)ᵀ is computed as Vᵀ·Wᵀ, whose gradient Vᵀ-side product ḡ·W is the fast GEMM layout on CPU.
    """
    wv_t = F.linear(vt.to(weight.dtype), weight).to(vt.dtype)  # (W·V)ᵀ, (r, d_out)
    return vt, -(wv_t.t() @ t)


def orthogonality_penalty(u: Tensor) -> Tensor:
    """‖I − ÛᵀÛ‖²_F (paper Eq. 6, squared Frobenius norm)."""
    v = normalized_columns(u)
    eye = torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
    return (eye - v.t() @ v).pow(2).sum()


def init_hra_u(u: Tensor, symmetric: bool) -> None:
    """Symmetric init (pairs of equal columns, H = I) for even r, else Kaiming-uniform (a = √5)."""
    d_in, r = u.shape
    with torch.no_grad():
        if symmetric and r % 2 == 0:
            half = torch.empty(d_in, r // 2, dtype=u.dtype, device=u.device)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u.copy_(half.repeat_interleave(2, dim=1))
            return
        if symmetric:
            warnings.warn(
                f"HRA with odd r={r}: the symmetric init (H = I, the model starts as the base model) needs an "
                "even r, so U gets a Kaiming init and the adapted model differs from the base model at step 0.",
                stacklevel=4,
            )
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))


# -- the adapter ---------------------------------------------------------------------------------------------
class HRAAdapter(Adapter):
    """HRA on one layer: the parameter ``hra_u`` (d_in, r)."""

    config_class = HRAConfig
    model_functions: ClassVar[dict[str, str]] = {"orthogonality_loss": "sum"}
    multiplicative = True

    def __init__(self, layer: LayerView, config: HRAConfig, r: int) -> None:
        super().__init__(layer, config, r)
        self.apply_GS = config.apply_GS
        self.orthogonality_weight = config.orthogonality_weight
        self.forward_path = config.forward_path
        self.hra_u = nn.Parameter(torch.empty(layer.d_in, r))
        init_hra_u(self.hra_u, symmetric=config.init_weights)

    def reflectors(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(V, T) with H = I − V·T·Vᵀ, in fp32 or wider (``dtype``: in that dtype)."""
        u = self.hra_u if self.hra_u.dtype in (torch.float32, torch.float64) else self.hra_u.float()
        u = u if dtype is None else u.to(dtype)
        if self.apply_GS:
            v = orthonormal_columns(u)
            return v, 2.0 * torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
        vt, t = wy_factors(u)
        return vt.t(), t

    def multiplicative_path(self, x: Tensor, layer: LayerView) -> str:
        if layer.quantized:  # the base layer runs only with its own (quantized) weight: W is never rebuilt
            return "activation"
        if layer.kind == "conv2d":
            return "weight"
        if self.forward_path != "auto":
            return self.forward_path
        n = layer.num_tokens(x)
        if torch.is_grad_enabled() and self.hra_u.requires_grad:  # training: avoid any extra N·d_out·d_in GEMM
            if x.requires_grad:  # the base layer computes ḡ_x' = ḡ_y·W anyway: x·Hᵀ then costs what LoRA does
                return "activation"
            return "lowrank" if n > 2 * self.r else "activation"  # 4·d_out·d_in·r FLOPs vs 2·N·d_out·d_in
        return "weight" if n > layer.d_out else "activation"

    def transform_input(self, x: Tensor, layer: LayerView) -> Tensor:
        """x·Hᵀ = x − ((x·V)·Tᵀ)·Vᵀ."""
        v, t = self.reflectors()
        vt = v.t().to(x.dtype).contiguous()  # (r, d_in): F.linear picks the fast GEMM layouts in backward
        return x - F.linear(F.linear(F.linear(x, vt), t.to(x.dtype)), vt.t())

    def delta(self, x: Tensor, layer: LayerView) -> Tensor:
        """x·(W·H)ᵀ − x·Wᵀ = −((x·V)·Tᵀ)·(W·V)ᵀ: like LoRA with B = −W·V·T, A = Vᵀ, no d × d tensor."""
        v, t = self.reflectors()
        a, b = lowrank_factors(v.t(), t, layer.flat_weight())
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))  # B acts on r-wide features only

    def batched_term(self, layer: LayerView) -> Reflections | None:
        """(V, T) of H = I − V·T·Vᵀ for mixed-adapter batches, applied as :meth:`transform_input` is (x·Hᵀ before
        the base layer), on Linear and Conv1D layers (Conv2d: grouped rows)."""
        return Reflections(*self.reflectors()) if layer.kind in ("linear", "conv1d") else None

    def merged_weight(self, weight: Tensor, **options: Any) -> Tensor:
        v, t = self.reflectors()
        return reflect_weight(weight.to(v.dtype), v, t).to(weight.dtype)

    def lora_factors(self, weight: Tensor, **options: Any) -> tuple[Tensor, Tensor]:
        """W·H = W − (W·V)·T·Vᵀ: a LoRA with A = T·Vᵀ (r × d_in) and B = −W·V (d_out × r), scaling 1.

        B depends on ``weight``, the weight this adapter multiplies (W, or W·H₁ after an earlier HRA adapter).
        """
        with torch.no_grad():
            v, t = self.reflectors(weight.dtype)
            return t @ v.t(), -(weight @ v)

    def unmerged_weight(self, weight: Tensor, **options: Any) -> Tensor:
        v, t = self.reflectors()
        return reflect_weight(weight.to(v.dtype), v, t.t()).to(weight.dtype)

    def orthogonality_loss(self) -> Tensor:
        """HRA's regulariser λ·‖I − ÛᵀÛ‖²_F of this layer (on AdapterModel: Σ over the active HRA layers, 0 without)."""
        return self.orthogonality_weight * orthogonality_penalty(self.hra_u.float())

    @classmethod
    def diagnostics(cls, state: dict[str, Tensor]) -> dict[str, float]:
        """‖I − ÛᵀÛ‖_F of the layer's reflection vectors (0: orthonormal, H is then I − 2·Û·Ûᵀ)."""
        if "hra_u" not in state:
            return {}
        return {"orthogonality ‖I − ÛᵀÛ‖_F": float(orthogonality_penalty(state["hra_u"].float()).sqrt())}

    def extra_loss(self) -> Tensor | None:
        return self.orthogonality_loss() if self.orthogonality_weight > 0 else None
