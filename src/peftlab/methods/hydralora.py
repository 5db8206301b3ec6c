r"""HydraLoRA: a shared A and routed B heads (Tian et al., NeurIPS 2024, arXiv 2404.19245).

Each adapted layer has one shared down-projection A (r × d_in), N up-projection heads B_i (d_out × r)
and a router W_g (N × d_in, or N × r with ``router_input="lora"``, as the paper writes it). Per token:

    h = A·dropout(x)                                            (computed once for all heads)
    ω = softmax(W_g·u / T)   u = x (the released code) or h     (fp32; ``top_k``: keep k, renormalise)
    y = W·x + b + s·Σ_i ω_i·B_i·h,   s = α / r

All heads run in one matrix product: Σ_i ω_i·B_i·h = [B_1 … B_N]·(ω ⊗ h), a (N·r → d_out) GEMM on the
(…, N·r) tensor ω ⊗ h. With N = 1 this is LoRA; with a fixed ω it is LoRA with B = Σ_i ω_i·B_i.

Initialisation: A and W_g Kaiming-uniform (a = √5), every B_i = 0, so ΔW = 0 at the start (and the
router's first gradient is 0: heads diverge through routing and dropout).

Merge: ω depends on the token, so ΔW does not exist in general and ``merge()`` refuses. With a fixed
mixture, ``merge(head_weights=w)`` folds W ← W + s·(Σ_i w_i·B_i)·A; unmerge subtracts the same term (the wrapped
layer records w with the merge and passes it back).

Load balancing (``balance_loss_weight`` = λ > 0, Switch Transformer style, over the tokens of the last
forward): loss = λ·N·Σ_i f_i·P_i, f_i = share of tokens whose most probable head is i (no gradient),
P_i = mean router probability of head i (dense softmax, before ``top_k``). It is 1·λ when routing is
uniform and N·λ when one head takes everything.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftlab.batched import Routed
from peftlab.config import (
    AdapterConfig,
    check_finite,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_probability,
    register_method,
)
from peftlab.errors import ConfigError, MergeError, UnsupportedError
from peftlab.layers import LayerView
from peftlab.methods.base import Adapter

ROUTER_INPUTS = ("x", "lora")
AUTO = "auto"  # num_heads="auto": resolved from the training texts before the model is built


@register_method
@dataclass
class HydraLoraConfig(AdapterConfig):
    """Config for HydraLoRA (see the module docstring for the math).

    Args:
        alpha: scaling numerator; the update is scaled by alpha / r.
        dropout: dropout on the adapter's input (training only; one mask shared by all heads).
        num_heads: N, the number of B heads (``peftlab.estimate_num_heads`` suggests one).
        router_input: ``"x"`` routes on the layer input (the released code), ``"lora"`` on A·dropout(x)
            (the paper's W_g ∈ R^{r×N}).
        top_k: keep only the k most probable heads per token and renormalise (``None``: dense routing).
        router_temperature: T in softmax(W_g·u / T); large T makes ω uniform.
        balance_loss_weight: λ of the load-balancing loss (0: off; the multimodal code uses 0.05).
        init_weights: ``True``: every B_i = 0 (ΔW = 0 at start); ``False``: random B_i (for tests).
    """

    method: ClassVar[str] = "hydralora"
    description: ClassVar[str] = "HydraLoRA: shared A, routed B heads"
    default_lr: ClassVar[float] = 3e-3
    cli_fields: ClassVar[tuple[str, ...]] = ("num_heads",)
    alpha: float = 16.0
    dropout: float = 0.0
    num_heads: int | str = field(default=4, metadata={
        "help": "HydraLoRA's number of B heads N: a number, or 'auto' (estimate_num_heads on the training texts)"})
    router_input: str = "x"
    top_k: int | None = None
    router_temperature: float = 1.0
    balance_loss_weight: float = 0.0
    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        check_finite("alpha", self.alpha)
        check_probability("dropout", self.dropout)
        if self.num_heads != AUTO:
            check_positive_int("num_heads", self.num_heads, hint="or 'auto' to estimate it from the training texts")
        if self.router_input not in ROUTER_INPUTS:
            raise ConfigError(
                f"router_input={self.router_input!r}; use 'x' (route on the layer input) or 'lora' (route on A·x)"
            )
        if self.top_k is not None and (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, int)
            or not 1 <= self.top_k <= (self.top_k if self.num_heads == AUTO else self.num_heads)
        ):
            raise ConfigError(
                f"top_k must be None (dense routing) or an integer in 1..num_heads={self.num_heads}; got {self.top_k!r}"
            )
        check_positive("router_temperature", self.router_temperature)
        check_nonnegative("balance_loss_weight", self.balance_loss_weight)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True or False; got {self.init_weights!r}")


    def unresolved_fields(self) -> list[str]:
        return ["num_heads"] if self.num_heads == AUTO else []

    def resolve(self, texts: Callable[[], Sequence[str]] | None, seed: int = 0) -> HydraLoraConfig:
        """``num_heads="auto"``: the cluster count :func:`peftlab.estimate_num_heads` finds in ``texts()``."""
        if self.num_heads != AUTO:
            return self
        if texts is None:
            raise ConfigError("num_heads='auto' needs the training texts to cluster; give a number instead")
        from peftlab.data.clusters import estimate_num_heads

        n, _ = estimate_num_heads(list(texts()), max_heads=8, seed=seed)
        print(f"num_heads=auto: estimate_num_heads found {n} cluster(s) in the training texts", flush=True)
        return replace(self, num_heads=n)


# -- the math, as pure functions ------------------------------------------------------------------------
def routing_weights(logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> tuple[Tensor, Tensor]:
    """(ω, p) from router logits (…, N): p = softmax(logits / T) in fp32 (or wider), ω = p or its top-k renormalised."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(dtype) / temperature, dim=-1)
    if top_k is None or top_k >= probs.shape[-1]:
        return probs, probs
    kept, index = probs.topk(top_k, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, index, kept / kept.sum(-1, keepdim=True))
    return weights, probs


def routed_weights(logits: Tensor, top_k: int | None) -> Tensor:
    """ω from logits already divided by the temperature (:func:`routing_weights` with T = 1)."""
    return routing_weights(logits, 1.0, top_k)[0]


def stacked_heads(heads: Tensor) -> Tensor:
    """[B_1 … B_N]: heads (N, d_out, r) as one (d_out, N·r) matrix."""
    n, d_out, r = heads.shape
    return heads.permute(1, 0, 2).reshape(d_out, n * r)


def mix_heads(h: Tensor, weights: Tensor, heads: Tensor) -> Tensor:
    """Σ_i ω_i·B_i·h = [B_1 … B_N]·(ω ⊗ h) for h (…, r), ω (…, N), heads (N, d_out, r): one GEMM."""
    mixed = (weights.to(h.dtype).unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)  # (…, N·r)
    return mixed @ stacked_heads(heads).t()


def balance_loss(probs: Tensor) -> Tensor:
    """Switch-style N·Σ_i f_i·P_i over all tokens of probs (…, N); f from the argmax, P = mean probability."""
    p = probs.reshape(-1, probs.shape[-1])
    n = p.shape[-1]
    f = torch.bincount(p.detach().argmax(-1), minlength=n).to(p.dtype) / p.shape[0]
    return n * (f * p.mean(0)).sum()


# -- the adapter ---------------------------------------------------------------------------------------------
class HydraLoraAdapter(Adapter):
    """HydraLoRA on one layer: ``lora_A`` (r, d_in), ``lora_B`` (N, d_out, r), ``router`` Linear(→ N)."""

    config_class = HydraLoraConfig
    model_functions: ClassVar[dict[str, str]] = {"routing_stats": "per_layer"}
    supported_kinds = ("linear", "conv1d")
    merge_options = ("head_weights",)

    def __init__(self, layer: LayerView, config: HydraLoraConfig, r: int) -> None:
        super().__init__(layer, config, r)
        self.scaling = config.alpha / r
        self.num_heads = config.num_heads
        self.router_input = config.router_input
        self.top_k = config.top_k
        self.temperature = float(config.router_temperature)
        self.balance_loss_weight = float(config.balance_loss_weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, layer.d_in))
        self.lora_B = nn.Parameter(torch.empty(config.num_heads, layer.d_out, r))
        self.router = nn.Linear(layer.d_in if config.router_input == "x" else r, config.num_heads, bias=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
            for head in self.lora_B:  # init only: each head like LoRA's B
                nn.init.zeros_(head) if config.init_weights else nn.init.kaiming_uniform_(head, a=math.sqrt(5))
        self._weights: Tensor | None = None  # ω of the last forward (…, N)
        self._probs: Tensor | None = None  # dense p of the last forward, with its graph (balance loss)

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy, pickle) drop the last forward's ω, which may be part of an autograd graph."""
        return {**super().__getstate__(), "_weights": None, "_probs": None}

    @classmethod
    def low_rank_factors(cls, state: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        """The shared A and each head B_h of B."""
        return {"A": [state["lora_A"]], "B": list(state["lora_B"])} if "lora_A" in state else {}

    def route(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(ω, p) for router input u (…, d_in or r); see :func:`routing_weights`."""
        return routing_weights(self.router(u), self.temperature, self.top_k)

    def delta(self, x: Tensor, layer: LayerView) -> Tensor:
        x = x.to(self.lora_A.dtype)
        h = layer.down(self.dropout(x), self.lora_A)
        weights, probs = self.route(x if self.router_input == "x" else h)
        self._weights, self._probs = weights, probs
        return mix_heads(h * self.scaling, weights, self.lora_B)  # s scales the r-wide features

    def batched_term(self, layer: LayerView) -> Routed:
        """Shared A, router and s·B_i heads for mixed-adapter batches; routing as in :meth:`delta` (ω per token).
        The routing statistics of the last forward are not updated by a mixed batch's batched path."""
        return Routed(self.lora_A, self.router.weight, self.scaling * self.lora_B, self.temperature,
                      self.router_input == "lora", partial(routed_weights, top_k=self.top_k), ("hydralora", self.top_k))

    # -- merge ----------------------------------------------------------------------------------------
    def _head_weights(self, head_weights: Sequence[float] | Tensor | None) -> Tensor:
        if head_weights is None:
            raise MergeError(
                f"HydraLoRA cannot be merged as is: its router picks a mixture of the {self.num_heads} heads per "
                "token, so the update ΔW depends on the input. To fold a fixed mixture s·(Σ w_i·B_i)·A into W, "
                f"pass head_weights (non-negative, summing to 1), e.g. the uniform one: model.merge(head_weights=["
                f"{', '.join([f'1/{self.num_heads}'] * self.num_heads)}]). model.routing_stats() shows the mean "
                "ω per layer."
            )
        w = torch.as_tensor(head_weights, dtype=torch.float64).flatten()
        if w.numel() != self.num_heads:
            raise MergeError(f"head_weights has {w.numel()} values; this adapter has num_heads={self.num_heads}")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise MergeError(f"head_weights must be finite and non-negative; got {w.tolist()}")
        if abs(float(w.sum()) - 1.0) > 1e-6:
            raise MergeError(
                f"head_weights must sum to 1 (a mixture of heads, like ω); got sum {float(w.sum()):.6g}. "
                "Divide by the sum if that is what you mean."
            )
        return w

    def delta_weight(self, head_weights: Tensor) -> Tensor:
        """ΔW = s·(Σ_i w_i·B_i)·A for a fixed mixture w, flat (d_out, d_in)."""
        b = torch.einsum("n,nor->or", head_weights.to(self.lora_B.dtype), self.lora_B)
        return self.scaling * (b @ self.lora_A)

    def merged_weight(
        self, weight: Tensor, head_weights: Sequence[float] | Tensor | None = None, **options: Any
    ) -> Tensor:
        w = self._head_weights(head_weights)
        return weight + self.delta_weight(w.to(self.lora_B.device)).to(weight.dtype)

    def lora_factors(
        self, weight: Tensor, head_weights: Sequence[float] | Tensor | None = None, **options: Any
    ) -> tuple[Tensor, Tensor]:
        """(A, s·Σ_i w_i·B_i) for a fixed mixture w (``head_weights``); with the router, ω depends on the
        token, so there is no LoRA form and this refuses."""
        if head_weights is None:
            uniform = ",".join(["%.4g" % (1 / self.num_heads)] * self.num_heads)
            raise UnsupportedError(
                f"HydraLoRA with its router is not a LoRA adapter: the mixture ω of its {self.num_heads} heads "
                "depends on each token. Export a fixed mixture instead: head_weights=[w_1, …] (non-negative, summing "
                f"to 1; on the command line --head-weights {uniform} "
                "for the uniform one), the LoRA with B = Σ w_i·B_i, as merge(head_weights=...) folds it"
            )
        w = self._head_weights(head_weights).to(device=self.lora_B.device, dtype=weight.dtype)
        with torch.no_grad():
            b = torch.einsum("n,nor->or", w, self.lora_B.to(weight.dtype))
            return self.lora_A.to(weight.dtype), self.scaling * b

    def example_merge_options(self) -> dict[str, Any]:
        """Uniform head weights, w_i = 1/N."""
        return {"head_weights": [1.0 / self.num_heads] * self.num_heads}

    def unmerged_weight(
        self, weight: Tensor, head_weights: Sequence[float] | Tensor | None = None, **options: Any
    ) -> Tensor:
        if head_weights is None:
            raise MergeError(
                "HydraLoRA unmerge needs the head_weights the adapter was merged with; the wrapped layer records "
                "them when it merges, so call model.unmerge() instead of unmerged_weight() directly"
            )
        w = self._head_weights(head_weights)
        return weight - self.delta_weight(w.to(self.lora_B.device)).to(weight.dtype)

    # -- routing statistics and the balance loss --------------------------------------------------------
    def routing_stats(self) -> Tensor:
        """Mean ω per head over the tokens of the last forward, shape (num_heads,), detached (on AdapterModel:
        ``{layer name: mean ω}`` over the active HydraLoRA layers)."""
        if self._weights is None:
            raise RuntimeError("no routing statistics yet: run a forward pass through the model first")
        return self._weights.detach().reshape(-1, self.num_heads).float().mean(0)

    def checkpointing_problem(self, reentrant: bool) -> str | None:
        """The balance loss is built from the router probabilities of the forward; reentrant checkpointing runs
        that forward without autograd (and its recomputation comes after the loss), so the loss could not train
        the router. Non-reentrant checkpointing keeps the graph: the loss and its gradient are those of a run
        without checkpointing (the recomputation in backward replaces, never adds to, the recorded probabilities)."""
        if reentrant and self.balance_loss_weight > 0:
            return (f"HydraLoRA's balance loss (balance_loss_weight={self.balance_loss_weight}) needs the forward's "
                    "autograd graph, which reentrant checkpointing does not keep; use gradient_checkpointing_kwargs="
                    "{'use_reentrant': False} or balance_loss_weight=0")
        return None

    def extra_loss(self) -> Tensor | None:
        if self.balance_loss_weight <= 0 or self._probs is None:
            return None
        if self.training and self.router.weight.requires_grad and not self._probs.requires_grad:
            warnings.warn(
                "HydraLoRA's balance loss has no gradient: the last forward ran without autograd (e.g. reentrant "
                "gradient checkpointing); use gradient_checkpointing_kwargs={'use_reentrant': False}.",
                stacklevel=2,
            )
        return self.balance_loss_weight * balance_loss(self._probs)
