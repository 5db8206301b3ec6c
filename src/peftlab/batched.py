"""Mixed-adapter batches in one pass per layer: every row's adapter applied with per-row gathered weights.

Batched LoRA serving (Punica's BGMV kernel, S-LoRA) runs a batch whose rows use different adapters at about
the base model's cost: the adapters' weights are stacked, each row gathers its own, and one batched matrix
product computes every row's update. This module does that in each wrapped layer during a mixed-adapter call
(:mod:`peftlab.mixed`), for every method whose adapter gives its update in one of three forms
(``Adapter.batched_term``):

- :class:`LowRank` (A, B): Δ(x) = (x·Aᵀ)·Bᵀ, A (r, d_in), B (d_out, r), the scaling folded into B
  (LoRA: B ← s·B; MTLoRA: B ← s·B·T, block-diagonal B and T on fused layers);
- :class:`Routed`: HydraLoRA's Δ(x) = Σ_i ω_i·B_i·h, h = A·x, ω = route(W_g·u / T) per token (u = x or h);
- :class:`Reflections` (V, T): HRA's x ↦ x·Hᵀ = x − ((x·V)·Tᵀ)·Vᵀ, before the base layer, for a row composing
  several; a row with one of them adds it as the low-rank x·(W·H − W)ᵀ = (x·V)·(−W·V·T)ᵀ instead (W·V·T cached,
  stacked with the other low-rank terms), which spares a copy of the layer's input.

For the n rows x_i (each (L, d_in)) of one layer's input:

    x'_i = x_i·H_iᵀ            rows with reflections (others: x'_i = x_i)
    y    = base(x')            one base-layer call for all rows
    y_i += Δ_i(x_i)            rows with additive adapters

each term computed for all of its rows at once, ``torch.bmm`` over weights gathered per row from the stacks. A
row that composes several adapters of one form uses one *slot* per adapter (slot j: the j-th), reflections in
the order x·(H₁H₂)ᵀ = (x·H₂ᵀ)·H₁ᵀ. A slot runs on

- its rows' slice of the batch when they are consecutive (views: no copy);
- every row when more than half of the rows use it, the others on the stack's zero entry (Δ = 0, H = I,
  exactly): copying the slot's rows out of x and adding their Δ back costs more than running the few others
  (measured on SmolLM2's q_proj / v_proj, 8 rows × 128 tokens, r = 8: 6 of 8 rows gathered took ≈ 1.3× the
  time of all 8 rows run dense);
- its rows gathered (``index_select``) otherwise, their Δ added back with ``index_add``, so that a batch of
  mostly base rows costs about the base layer alone.

Stacks pad every rank to the largest r of their terms (and HydraLoRA's heads to the largest N, with router
logits −∞ for the padded heads). Padding is exact: a zero row of A gives an exact 0 feature, a zero column of
B or row/column of T adds exact zeros, exp(−∞) = 0, so a padded term sums the same products plus exact zeros
(only the order of the floating-point sums may differ, as between any two GEMM calls).

Stacks are cached per layer and rebuilt when its adapters change: one added or deleted, a parameter replaced
(loading, ``.to()``) or changed in place (training steps, ``load_adapter``: tensors' version counters).
Writes through ``param.data`` bypass version counters; call :func:`clear_stacks` after them. The stacks carry
no gradient (mixed batches are for inference).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn


# -- the forms an adapter gives ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LowRank:
    """Δ(x) = (x·Aᵀ)·Bᵀ: ``a`` (r, d_in), ``b`` (d_out, r), any scaling folded into ``b``."""

    a: Tensor
    b: Tensor


@dataclass(frozen=True)
class Routed:
    """Δ(x) = Σ_i ω_i·B_i·h per token, h = A·x, ω = ``weights_of``(W_g·u / T), u = h if ``route_on_features``
    else x. ``a`` (r, d_in), ``router`` W_g (N, d_in or r), ``heads`` (N, d_out, r) with the scaling folded in;
    terms of equal ``group`` stack together and must route alike (``weights_of``: logits (…, N) → ω (…, N))."""

    a: Tensor
    router: Tensor
    heads: Tensor
    temperature: float
    route_on_features: bool
    weights_of: Callable[[Tensor], Tensor]
    group: Hashable


@dataclass(frozen=True)
class Reflections:
    """x ↦ x·Hᵀ = x − ((x·V)·Tᵀ)·Vᵀ (before the base layer): ``v`` (d_in, r), ``t`` (r, r)."""

    v: Tensor
    t: Tensor


BatchedTerm = Union[LowRank, Routed, Reflections]  # noqa: UP007  (a runtime alias)


def padded(t: Tensor, shape: Sequence[int]) -> Tensor:
    """``t`` in the leading corner of a zero tensor of ``shape`` (every dimension at least ``t``'s)."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def with_zero(stack: Tensor) -> Tensor:
    """``stack`` (K, …) with a zero entry appended at index K: the term of a row that has none in this stack."""
    return torch.cat([stack, stack.new_zeros(1, *stack.shape[1:])])


# -- stacks: one per form (and routing group) on a layer ----------------------------------------------------------
def project(a: Tensor, x: Tensor) -> Tensor:
    """x·Aᵀ per row for x (n, L, d_in), A (n, r, d_in), computed as (A·xᵀ)ᵀ: an (n, L, r) view of an (n, r, L)
    product. On CPU (MKL) that GEMM, r × L outputs summed over d_in, runs these short, wide products about twice as
    fast as the (n, L, r) one (x·Aᵀ with A transposed by strides; a contiguous (d_in, r) operand is slower still),
    and the strided result is as fast an operand of the B product (measured: SmolLM2's q_proj/v_proj, r = 8,
    8 rows × 128 tokens)."""
    return torch.bmm(a, x.transpose(1, 2)).transpose(1, 2)


class LowRankStack:
    """K low-rank terms: A (K, r, d_in) and Bᵀ (K, r, d_out), ranks padded with zeros to the largest r, and a zero
    entry at index K (:func:`with_zero`)."""

    multiplicative = False

    def __init__(self, terms: Sequence[LowRank]) -> None:
        r = max(t.a.shape[0] for t in terms)
        self.a = with_zero(torch.stack([padded(t.a, (r, t.a.shape[1])) for t in terms]))
        self.b_t = with_zero(torch.stack([padded(t.b, (t.b.shape[0], r)).t() for t in terms]))
        self.device = self.a.device
        self.zero = len(terms)  # the index of the zero entry

    def gather(self, index: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
        return self.a.index_select(0, index), self.b_t.index_select(0, index)

    def features(self, x: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """(h, Bᵀ) with Δ = h·Bᵀ for rows x (n, L, d_in), each with its own gathered (A, Bᵀ): h = x·Aᵀ."""
        a, b_t = weights
        return project(a, x.to(a.dtype)), b_t


class RoutedStack:
    """K routed terms of one group: A (K, r, d_in), W_g (K, N, d_in or r), [B_1 … B_N]ᵀ (K, N·r, d_out),
    the padded heads masked with −∞ logits (K, N) and the temperatures (K,), and a zero entry at index K (zero
    weights, no mask, T = 1: ω is finite and the zero heads give Δ = 0). Routers on x are stacked under A,
    [A; W_g] (K, r + N, d_in), so that one product gives h and the logits."""

    multiplicative = False

    def __init__(self, terms: Sequence[Routed]) -> None:
        first = terms[0]
        self.route_on_features, self.weights_of = first.route_on_features, first.weights_of
        r = max(t.a.shape[0] for t in terms)
        n = max(t.heads.shape[0] for t in terms)
        d_out, width = first.heads.shape[1], r if first.route_on_features else first.a.shape[1]
        self.r = r
        self.a = with_zero(torch.stack([padded(t.a, (r, t.a.shape[1])) for t in terms]))
        self.router = with_zero(torch.stack([padded(t.router, (n, width)) for t in terms]))
        if not self.route_on_features:
            self.a, self.router = torch.cat([self.a, self.router], dim=1), None
        # [B_1 … B_N] (d_out, N·r) transposed: row i·r + j is head i's column j
        self.heads_t = with_zero(torch.stack([padded(t.heads, (n, d_out, r)).transpose(1, 2).reshape(n * r, d_out)
                                              for t in terms]))
        self.mask = torch.zeros(len(terms) + 1, n, dtype=first.a.dtype, device=first.a.device)
        for k, t in enumerate(terms):
            self.mask[k, t.heads.shape[0]:] = float("-inf")
        self.temperature = torch.tensor([t.temperature for t in terms] + [1.0], dtype=first.a.dtype,
                                        device=first.a.device)
        self.device = first.a.device
        self.zero = len(terms)  # the index of the zero entry

    def gather(self, index: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
        return tuple(s if s is None else s.index_select(0, index)
                     for s in (self.a, self.router, self.mask, self.temperature, self.heads_t))

    def features(self, x: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """(ω ⊗ h, [B_1 … B_N]ᵀ) per row: Δ = Σ_i ω_i·B_i·h is their product."""
        a, router, mask, temperature, heads_t = weights
        projected = project(a, x.to(a.dtype))  # (n, L, r), or (n, L, r + N): h and the logits on x
        h = projected[..., :self.r]
        logits = torch.bmm(h, router.transpose(1, 2)) if self.route_on_features else projected[..., self.r:]
        omega = self.weights_of((logits + mask[:, None]) / temperature[:, None, None])
        return (omega.to(h.dtype).unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2), heads_t  # ω ⊗ h, (n, L, N·r)


class ReflectionStack:
    """K reflection chains: Vᵀ (K, r, d_in) and Tᵀ (K, r, r), padded with zeros to the largest r."""

    multiplicative = True

    def __init__(self, terms: Sequence[Reflections]) -> None:
        r = max(t.v.shape[1] for t in terms)
        self.v_t = with_zero(torch.stack([padded(t.v.t(), (r, t.v.shape[0])) for t in terms]))
        self.t_t = with_zero(torch.stack([padded(t.t.t(), (r, r)) for t in terms]))
        self.device = self.v_t.device
        self.zero = len(terms)  # the index of the zero entry

    def gather(self, index: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Per-row (Vᵀ, Tᵀ) in the activations' dtype (HRA's activation path computes in it)."""
        return tuple(s.index_select(0, index).to(dtype) for s in (self.v_t, self.t_t))

    def apply(self, x: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
        """x·Hᵀ for rows x (n, L, d_in)."""
        v_t, t_t = weights
        return x - torch.bmm(torch.bmm(torch.bmm(x, v_t.transpose(1, 2)), t_t), v_t)


Stack = Union[LowRankStack, RoutedStack, ReflectionStack]  # noqa: UP007
STACK_TYPES: dict[type, type] = {LowRank: LowRankStack, Routed: RoutedStack, Reflections: ReflectionStack}


def reflections_as_lowrank(term: Reflections, weight: Tensor) -> LowRank:
    """The reflections as an additive term on a layer with flat weight W (d_out, d_in), for a row with this one
    multiplicative adapter: x·(W·H)ᵀ = x·Wᵀ + (x·V)·(−W·V·T)ᵀ (HRA's "lowrank" path), A = Vᵀ, B = −W·V·T. The row
    then needs no copy of the layer's input, which the activation path must write x·Hᵀ into."""
    return LowRank(term.v.t(), -((weight.to(term.v.dtype) @ term.v) @ term.t))


def stack_key(term: BatchedTerm) -> Hashable:
    """Terms with equal keys share a stack."""
    if isinstance(term, Routed):
        return type(term).__name__, term.group, term.route_on_features
    return type(term).__name__


# -- the per-layer cache --------------------------------------------------------------------------------------------
@dataclass
class LayerStacks:
    """A layer's stacks: ``where`` maps an adapter name to (stack key, its index in that stack); adapters
    without a batched form (or not loaded yet) are absent. ``as_added``: the same for the additive form of
    reflections (:func:`reflections_as_lowrank`, stacked with the other low-rank terms). ``signature`` and
    ``refs`` tell when it is stale."""

    signature: tuple[Any, ...]
    refs: list[weakref.ref]
    where: dict[str, tuple[Hashable, int]]
    as_added: dict[str, tuple[Hashable, int]]
    stacks: dict[Hashable, Stack]


_CACHE: weakref.WeakKeyDictionary[nn.Module, LayerStacks] = weakref.WeakKeyDictionary()


def clear_stacks() -> None:
    """Forget every cached stack (needed only after writing adapter parameters through ``param.data``)."""
    _CACHE.clear()


def _signature(adapters: nn.ModuleDict, weight: Tensor) -> tuple[tuple[Any, ...], list[Any]]:
    """Names, module and parameter identities, version counters and storage of a layer's adapters (and of its
    base weight, which the reflections' additive form reads)."""
    sig: list[Any] = [(id(weight), weight._version, weight.data_ptr())]
    objects: list[Any] = [weight]
    for name, adapter in adapters.items():
        params = list(adapter.parameters())
        sig.append((name, id(adapter), tuple((id(p), p._version, p.data_ptr()) for p in params)))
        objects.extend([adapter, *params])
    return tuple(sig), objects


def layer_stacks(owner: nn.Module, adapters: nn.ModuleDict, layer: Any) -> LayerStacks:
    """The stacks of ``owner``'s adapters (``layer``: its :class:`~peftlab.layers.LayerView`), cached until they
    change (the cached entry holds weak references, so ids in its signature cannot have been reused)."""
    sig, objects = _signature(adapters, layer.module.weight)
    cached = _CACHE.get(owner)
    if cached is not None and cached.signature == sig and all(r() is not None for r in cached.refs):
        return cached
    groups: dict[Hashable, list[BatchedTerm]] = {}
    where: dict[str, tuple[Hashable, int]] = {}
    as_added: dict[str, tuple[Hashable, int]] = {}

    def add(term: BatchedTerm, table: dict[str, tuple[Hashable, int]], name: str) -> None:
        terms = groups.setdefault(stack_key(term), [])
        table[name] = (stack_key(term), len(terms))
        terms.append(term)

    with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable outside inference mode too
        weight = layer.flat_weight()
        for name, adapter in adapters.items():
            if any(p.is_meta for p in adapter.parameters()):
                continue  # not loaded (low_cpu_mem_usage); a mixed call refuses rows that use it
            term = adapter.batched_term(layer)
            if term is not None:
                add(term, where, name)
            if isinstance(term, Reflections) and weight.is_floating_point():  # (not a quantized base weight)
                add(reflections_as_lowrank(term, weight), as_added, name)
        stacks = {key: STACK_TYPES[type(terms[0])](terms) for key, terms in groups.items()}
    cached = LayerStacks(sig, [weakref.ref(o) for o in objects], where, as_added, stacks)
    _CACHE[owner] = cached
    return cached


# -- one layer's run for one mixed call ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """One stack applied to some rows: ``index`` (``None``: every row) or, when they are consecutive, ``span``;
    ``weights``: the stack's tensors gathered per row."""

    stack: Stack
    index: Tensor | None
    span: slice | None
    weights: tuple[Tensor, ...]

    def take(self, x: Tensor) -> Tensor:
        if self.index is None:
            return x
        return x[self.span] if self.span is not None else x.index_select(0, self.index)

    def transform(self, x: Tensor) -> Tensor:
        """``x`` with this slot's rows mapped by its (multiplicative) stack."""
        new = self.stack.apply(self.take(x), self.weights)
        return new if self.index is None else x.index_copy(0, self.index, new)

    def add_delta(self, out: Tensor, x: Tensor, in_place: bool) -> Tensor:
        """``out`` + Δ(``x``) on this slot's rows; consecutive rows of the same dtype add inside the GEMM."""
        h, up = self.stack.features(self.take(x), self.weights)
        if in_place and up.dtype == out.dtype and (self.index is None or self.span is not None):
            (out if self.index is None else out[self.span]).baddbmm_(h, up)
            return out
        delta = torch.bmm(h, up).to(out.dtype)
        if self.index is None:
            return out.add_(delta) if in_place else out + delta
        return out.index_add_(0, self.index, delta) if in_place else out.index_add(0, self.index, delta)


class LayerRun:
    """What one layer does for the rows of a mixed call: reflection slots on the input, the base layer once,
    then additive slots on the output (see the module docstring)."""

    def __init__(self, transforms: list[Slot], deltas: list[Slot]) -> None:
        self.transforms, self.deltas = transforms, deltas

    def forward(self, x: Tensor, base: Callable[[Tensor], Tensor]) -> Tensor:
        n = x.shape[0]
        flat = x.reshape(n, -1, x.shape[-1])  # (n, L, d_in)
        h = flat
        for slot in self.transforms:
            h = slot.transform(h)
        y = base(x if h is flat else h.reshape(x.shape))
        if not self.deltas:
            return y
        out = y.reshape(n, -1, y.shape[-1])
        in_place = not (torch.is_grad_enabled() and out.requires_grad)
        for slot in self.deltas:
            out = slot.add_delta(out, flat, in_place)
        return out.reshape(y.shape)


def layer_run(stacks: LayerStacks, entries: Sequence[tuple[str, ...]], available: frozenset[str],
              device: torch.device, dtype: torch.dtype) -> LayerRun | None:
    """The run of a layer holding the adapters ``available`` for rows with ``entries``; ``None`` when a row uses
    an adapter without a batched form here (the caller then runs the grouped path)."""
    slots: dict[tuple[Hashable, int], tuple[list[int], list[int]]] = {}
    for i, entry in enumerate(entries):
        names = [n for n in entry if n in available]
        if any(n not in stacks.where for n in names):
            return None
        mult = [n for n in names if stacks.stacks[stacks.where[n][0]].multiplicative]
        if len({stacks.where[n][0] for n in mult}) > 1:
            return None  # multiplicative adapters of two forms: their order would span stacks
        single = len(mult) == 1 and mult[0] in stacks.as_added  # added as x·(W·H − W)ᵀ, like a low-rank term
        used: dict[Hashable, int] = {}
        for n in names if single else [*reversed(mult), *(n for n in names if n not in mult)]:  # (x·H₂ᵀ)·H₁ᵀ
            key, k = stacks.as_added[n] if single and n in mult else stacks.where[n]
            j = used[key] = used.get(key, -1) + 1
            rows, index = slots.setdefault((key, j), ([], []))
            rows.append(i)
            index.append(k)
    transforms, deltas = [], []
    n = len(entries)
    for (key, _), (rows, index) in sorted(slots.items(), key=lambda item: item[0][1]):  # slot 0 first
        stack = stacks.stacks[key]
        span = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else None
        every = len(rows) == n or (span is None and 2 * len(rows) > n)  # (see the module docstring)
        if every and len(rows) < n:  # the other rows get the stack's zero entry
            full = [stack.zero] * n
            for i, k in zip(rows, index, strict=True):
                full[i] = k
            index = full
        weights = stack.gather(torch.tensor(index, device=stack.device), dtype)
        slot = Slot(stack, None if every else torch.tensor(rows, device=device), None if every else span, weights)
        (transforms if stack.multiplicative else deltas).append(slot)
    return LayerRun(transforms, deltas)
