"""Mixed-adapter batches: one forward pass in which each row of the batch uses its own adapter(s).

``model(**batch, adapter_names=[...])`` and ``model.generate(**batch, adapter_names=[...])`` take one entry
per row of the batch:

- ``"name"``: that adapter alone (as ``set_adapter("name")``);
- ``"__base__"`` (:data:`BASE`): no adapter (as ``disable_adapter()``);
- ``["a", "b"]``: the adapters composed, as ``set_adapter(["a", "b"])`` composes them (multiplicative
  ones first, then the additive ones; see :mod:`peftlab.methods.base`).

Inside every wrapped layer (:class:`peftlab.inject.AdapterLayer`) the *batched* path runs by default
(:mod:`peftlab.batched`): the layer's adapters are stacked (cached), each row gathers its own adapter's
weights, and one batched matrix product per form computes all rows' updates around a single base-layer call,
as batched LoRA serving does (Punica, S-LoRA). A layer where some row uses an adapter with no batched form
(Conv2d and Embedding layers, methods that give none) runs the *grouped* path instead, and so does every
layer inside :func:`grouped_rows`: the rows are grouped by what that layer runs for them
(:meth:`RowPlan.layout`), one gather puts the groups next to each other, then

- the rows whose adapters are all additive (and the base rows) share one base-layer call,
  y = x·Wᵀ + b, and each group adds its Δ(x_g) to its own slice of y;
- a group with a multiplicative adapter (HRA: W·H differs per group) runs the layer's ordinary composed
  forward on its slice;

and one gather puts the rows back in their order. There a method's code never sees the batching: it runs its
usual ``delta`` / ``transform_input`` on the rows of its group. ``modules_to_save`` copies
(:class:`peftlab.inject.TrainableCopy`) run each copy on the rows of the adapter that owns it (grouped).

Generation expands rows (``num_beams``, ``num_return_sequences``): a layer that sees k·B rows for B entries
uses each entry for k consecutive rows, as transformers lays them out and as HF PEFT repeats the names.
Layers must see the batch in the first dimension (true of every transformers model peftlab adapts).

Mixed batches are for inference: they are refused in training mode and while adapters are merged, and the
batched path computes no gradient for adapter parameters. The plan (and each layer's gathered weights, reused
by every generation step) lives on the wrapped layers for the duration of one call, so one model serves one
mixed call at a time (``peftlab serve`` runs its batches one after another).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from peftlab.batched import LayerRun, layer_run, layer_stacks
from peftlab.errors import AdapterError, MergeError

BASE = "__base__"
#: the keyword arguments that carry the batch, in the order they are looked for
BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values")
_GROUPED: ContextVar[bool] = ContextVar("peftlab_mixed_grouped", default=False)


@contextmanager
def grouped_rows() -> Iterator[None]:
    """Mixed-adapter calls inside this block run the grouped path in every layer (one group of rows per
    adapter, each running its method's own forward) instead of the batched one: the reference the batched path
    is compared with (the tests; ``benchmarks/mixed_batch.py`` measures both)."""
    token = _GROUPED.set(True)
    try:
        yield
    finally:
        _GROUPED.reset(token)


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of the grouped batch use ``names`` (``()``: the base layer alone)."""

    names: tuple[str, ...]
    start: int
    stop: int
    composed: bool  # True: the group needs its own base-layer call (a multiplicative adapter changes W)


@dataclass(frozen=True)
class Layout:
    """How one layer groups its rows: ``x.index_select(0, perm)`` puts the groups next to each other (``perm``
    ``None``: they already are), ``segments`` name them, ``inverse`` restores the row order."""

    perm: Tensor | None
    inverse: Tensor | None
    segments: tuple[Segment, ...]

    def gather(self, x: Tensor) -> Tensor:
        return x if self.perm is None else x.index_select(0, self.perm)

    def scatter(self, y: Tensor) -> Tensor:
        return y if self.inverse is None else y.index_select(0, self.inverse)


class RowPlan:
    """The adapters of every row of one mixed batch (validated entries, see :func:`normalize`)."""

    def __init__(self, entries: Sequence[tuple[str, ...]], batched: bool = True) -> None:
        self.entries = list(entries)
        self.batched = batched  # False: the grouped path in every layer (see grouped_rows)
        self._layouts: dict[Any, Layout] = {}
        self._runs: dict[Any, LayerRun | None] = {}

    def rows(self, n_rows: int) -> list[tuple[str, ...]]:
        """The entry of each of ``n_rows`` rows: B entries for B rows, or each repeated k times for k·B rows."""
        b = len(self.entries)
        if n_rows % b:
            raise AdapterError(
                f"a wrapped layer got {n_rows} rows for {b} adapter_names entries; mixed batches need the batch "
                "in the first dimension (and generation may only expand each row a whole number of times)"
            )
        k = n_rows // b
        return [e for e in self.entries for _ in range(k)]

    def layout(self, n_rows: int, device: torch.device, available: frozenset[str],
               multiplicative: frozenset[str]) -> Layout:
        """Group ``n_rows`` rows for a layer that holds the adapters ``available`` (of which ``multiplicative``
        change its weight). Additive groups come first (base rows at the very start), then composed ones."""
        key = (n_rows, device, available, multiplicative)
        if key not in self._layouts:
            groups: dict[tuple[str, ...], list[int]] = {}
            for i, entry in enumerate(self.rows(n_rows)):
                groups.setdefault(tuple(n for n in entry if n in available), []).append(i)
            order = sorted(groups, key=lambda names: (bool(multiplicative.intersection(names)), len(names) > 0))
            segments, perm, start = [], [], 0
            for names in order:
                rows = groups[names]
                segments.append(Segment(names, start, start + len(rows), bool(multiplicative.intersection(names))))
                perm.extend(rows)
                start += len(rows)
            if perm == sorted(perm):
                self._layouts[key] = Layout(None, None, tuple(segments))
            else:
                p = torch.tensor(perm, device=device)
                self._layouts[key] = Layout(p, torch.argsort(p), tuple(segments))
        return self._layouts[key]


    def run_for(self, layer: Any, x: Tensor) -> LayerRun | None:
        """The batched run of wrapped ``layer`` (an ``AdapterLayer``) for input ``x``, built once per call and
        row count (generation reuses it every step); ``None``: this layer takes the grouped path."""
        key = (layer, x.shape[0], x.device, x.dtype)
        if key not in self._runs:
            stacks = layer_stacks(layer, layer.adapters, layer.view)
            self._runs[key] = layer_run(stacks, self.rows(x.shape[0]), frozenset(layer.adapters), x.device, x.dtype)
        return self._runs[key]


def normalize(adapter_names: Sequence[str | Sequence[str]], known: Sequence[str],
              copies: dict[str, list[str]]) -> list[tuple[str, ...]]:
    """Validated entries, one tuple of adapter names per row (``()`` for ``"__base__"``).

    ``known``: the loaded adapters; ``copies``: module name → the adapters with their own copy of it
    (``modules_to_save``), of which a composed entry may use only one.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise AdapterError(
            f"adapter_names must be a list with one entry per row of the batch (an adapter name, {BASE!r}, "
            f"or a list of names to compose); got {adapter_names!r}"
        )
    entries = []
    for entry in adapter_names:
        names = (entry,) if isinstance(entry, str) else tuple(entry) if isinstance(entry, Sequence) else None
        if names is None or not all(isinstance(n, str) for n in names):
            raise AdapterError(f"adapter_names entry {entry!r} is not a name, {BASE!r} or a list of names")
        unknown = [n for n in names if n not in known and n != BASE]
        if unknown:
            raise AdapterError(f"no adapter named {unknown[0]!r}; loaded adapters: {list(known)} (or {BASE!r})")
        if BASE in names and len(names) > 1:
            raise AdapterError(
                f"adapter_names entry {list(names)} composes {BASE!r} with adapters; use one or the other"
            )
        if len(set(names)) < len(names):
            raise AdapterError(f"adapter_names entry {list(names)} names an adapter twice")
        for module_name, owners in copies.items():
            sharing = [n for n in names if n in owners]
            if len(sharing) > 1:
                raise AdapterError(
                    f"adapters {sharing} each have their own copy of {module_name} (modules_to_save), so they "
                    "cannot be composed in one row"
                )
        entries.append(() if names == (BASE,) else names)
    return entries


def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The number of rows of a call's batch: the first dimension of its input tensor."""
    for key in BATCH_KEYS:
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key].shape[0]
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


@contextmanager
def mixed_batch(model: Any, adapter_names: Sequence[str | Sequence[str]] | None, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Iterator[None]:
    """Give every wrapped layer of ``model`` (an ``AdapterModel``) the row plan of ``adapter_names`` for the
    duration of the block; nothing happens when ``adapter_names`` is ``None``."""
    if adapter_names is None:
        yield
        return
    if model.training:
        raise AdapterError("adapter_names is for inference: call model.eval() first (mixed batches do not train)")
    if model.merged_adapters:
        raise MergeError(
            f"adapter_names cannot be used while adapters {model.merged_adapters} are merged into the base "
            "weights; call model.unmerge() first"
        )
    layers = [m for _, m in (*model._layers(), *model._copies())]
    if any(m.disabled for m in layers):
        raise AdapterError("adapter_names cannot be used inside disable_adapter(); use '__base__' rows instead")
    copies = {name: list(w.copies) for name, w in model._copies()}
    plan = RowPlan(normalize(adapter_names, list(model.peft_config), copies), batched=not _GROUPED.get())
    model._check_loaded(sorted({n for entry in plan.entries for n in entry}), "run")  # none on the meta device
    rows = batch_size(args, kwargs)
    if rows != len(plan.entries):
        raise AdapterError(
            f"adapter_names has {len(plan.entries)} entries but the batch has {rows} rows; give one entry per row"
        )
    for m in layers:
        m.row_plan = plan
    try:
        yield
    finally:
        for m in layers:
            m.row_plan = None


def run_segments(layout: Layout, x: Tensor, plain: Callable[[Tensor], Tensor],
                 add: Callable[[Tensor, Tensor, tuple[str, ...]], Tensor],
                 composed: Callable[[Tensor, tuple[str, ...]], Tensor]) -> Tensor:
    """The grouped forward of one layer: ``plain`` (the base layer) once over the additive groups' rows, then
    ``add(y_g, x_g, names)`` per additive group and ``composed(x_g, names)`` per composed group."""
    xs = layout.gather(x)
    parts = []
    n_plain = sum(s.stop - s.start for s in layout.segments if not s.composed)
    if n_plain:
        head = xs[:n_plain]
        y = plain(head)
        pieces = [add(y[s.start:s.stop], head[s.start:s.stop], s.names) if s.names else y[s.start:s.stop]
                  for s in layout.segments if not s.composed]
        parts.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
    parts.extend(composed(xs[s.start:s.stop], s.names) for s in layout.segments if s.composed)
    return layout.scatter(parts[0] if len(parts) == 1 else torch.cat(parts))
