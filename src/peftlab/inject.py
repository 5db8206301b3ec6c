"""Finding target modules and wrapping them: written once, for every method.

- :class:`AdapterLayer` wraps one base layer and holds any number of named adapters of any method;
  its forward composes the active ones (see :mod:`peftlab.methods.base` for the order).
- :class:`TrainableCopy` wraps a module listed in ``modules_to_save`` and keeps one trainable copy per
  adapter.
- :func:`find_targets` turns a config's ``target_modules`` / ``exclude_modules`` /
  ``layers_to_transform`` into module names (matched by :mod:`peftlab.matching`), with errors that list
  what could have been targeted.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftlab import lowmem, matching
from peftlab.config import AdapterConfig
from peftlab.errors import MergeError, TargetError
from peftlab.layers import OUTPUT_HEADS, SUPPORTED_TYPES, LayerView, layer_kind, rounding_warning
from peftlab.methods.base import Adapter
from peftlab.mixed import RowPlan, run_segments


class Delegating(nn.Module):
    """A module that answers the attributes it does not have from the module it wraps (:meth:`delegate`),
    so model code that reads ``layer.weight`` or ``head.out_features`` works on the wrapped module."""

    own: ClassVar[tuple[str, ...]] = ()  # its own submodules, never delegated (delegate() reads them)

    def delegate(self) -> nn.Module:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self.own:
                raise
            return getattr(self.delegate(), name)


class AdapterLayer(Delegating):
    """A base layer plus named adapters.

    ``forward(x)`` = base layer with W·H₁⋯H_k (active multiplicative adapters, in order) plus
    Σ Δᵢ(x) over active additive adapters. Adapters listed in ``merged`` are already in the base weight.
    While ``row_plan`` is set (a mixed-adapter batch, :mod:`peftlab.mixed`), each group of rows gets that
    composition with its own adapters instead of the active ones.
    """

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.layer_name = name
        self.active: list[str] = []
        self.merge_record: dict[str, dict[str, Any]] = {}  # adapter name → its merge options, in merge order
        self.disabled = False
        self.row_plan: RowPlan | None = None  # set for the duration of a mixed-adapter call
        self._view: LayerView | None = None

    @property
    def merged(self) -> list[str]:
        """Names of the adapters merged into the base weight, in merge order."""
        return list(self.merge_record)

    @property
    def in_features(self) -> int:
        """Input width as HF PEFT's wrapped layers give it: in_features (Linear, Conv1D's nx), in_channels
        (Conv2d) or num_embeddings (Embedding)."""
        return self._features()[0]

    @property
    def out_features(self) -> int:
        """Output width: out_features (Linear, Conv1D's nf), out_channels (Conv2d) or embedding_dim (Embedding)."""
        return self._features()[1]

    def _features(self) -> tuple[int, int]:
        kind, m = self.view.kind, self.base_layer
        if kind == "linear":
            return m.in_features, m.out_features
        if kind == "conv1d":  # weight (in, out)
            return tuple(m.weight.shape)  # type: ignore[return-value]
        if kind == "conv2d":
            return m.in_channels, m.out_channels
        return m.num_embeddings, m.embedding_dim

    @property
    def view(self) -> LayerView:
        if self._view is None or self._view.module is not self.base_layer:
            self._view = LayerView(self.base_layer, self.layer_name)
        return self._view

    own = ("base_layer", "adapters")

    def delegate(self) -> nn.Module:
        return self.base_layer

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.row_plan is not None:
            return self._forward_rows(self.row_plan, x, args, kwargs)
        names = [] if self.disabled else [n for n in self.active if n not in self.merged]
        return self._compose(x, names, args, kwargs)

    def _forward_rows(self, plan: RowPlan, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """A mixed-adapter batch: the batched path (:mod:`peftlab.batched`) where it applies, else the grouped one:
        the base layer once over the rows whose adapters here are additive (or none), each group adding its
        Δ(x_g); a group with a multiplicative adapter runs :meth:`_compose` on its rows."""
        run = plan.run_for(self, x) if plan.batched else None
        if run is not None:  # every row's adapters stacked and applied at once (peftlab.batched)
            return run.forward(x, lambda rows: self.base_layer(rows, *args, **kwargs))
        adapters, view = self.adapters, self.view
        multiplicative = frozenset(n for n, a in adapters.items() if a.multiplicative)
        layout = plan.layout(x.shape[0], x.device, frozenset(adapters), multiplicative)

        def add(y: Tensor, rows: Tensor, names: tuple[str, ...]) -> Tensor:
            for n in names:
                y = y + adapters[n].delta(rows, view).to(y.dtype)
            return y

        return run_segments(layout, x, lambda rows: self.base_layer(rows, *args, **kwargs), add,
                            lambda rows, names: self._compose(rows, list(names), args, kwargs))

    def _compose(self, x: Tensor, names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The base layer with the adapters ``names`` composed (multiplicative first, then additive)."""
        if not names:
            return self.base_layer(x, *args, **kwargs)
        adapters = [self.adapters[n] for n in names]
        view = self.view
        mult = [a for a in adapters if a.multiplicative]
        paths = [a.multiplicative_path(x, view) for a in mult]
        added = [a for a in adapters if not a.multiplicative]
        if paths == ["lowrank"]:  # one multiplicative adapter, written as base(x) + Δ(x)
            mult, added = [], [*mult, *added]
        if not mult:
            y = self.base_layer(x, *args, **kwargs)
        elif "weight" in paths or "lowrank" in paths:
            weight = view.flat_weight()
            for a in mult:
                weight = a.merged_weight(weight)
            y = view.forward_with_weight(x, weight)
        else:
            h = x
            for a in reversed(mult):  # x·(H₁H₂)ᵀ = (x·H₂ᵀ)·H₁ᵀ
                h = a.transform_input(h, view)
            y = self.base_layer(h, *args, **kwargs)
        for a in added:
            y = y + a.delta(x, view).to(y.dtype)
        return y

    # -- merging ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def plan_merge(self, merges: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], Tensor] | None:
        """The weight after merging ``merges`` (adapter name → merge options), without writing it.

        Adapters this layer lacks or has merged already are skipped; multiplicative ones go first. Each
        adapter gets only the options its method declares (``Adapter.merge_options``); the plan's record
        (name → those options) is what :meth:`commit_merge` stores and :meth:`unmerge` passes back.
        """
        todo = [n for n in merges if n in self.adapters and n not in self.merge_record]
        if not todo:
            return None
        todo.sort(key=lambda n: not self.adapters[n].multiplicative)  # stable: W·H… first, then +ΔW
        if any(self.adapters[n].multiplicative for n in todo) and any(
            not self.adapters[n].multiplicative for n in self.merge_record
        ):
            raise MergeError(
                f"{self.layer_name}: cannot merge a multiplicative adapter on top of merged additive "
                f"adapters {self.merged}; call unmerge() first and merge them together"
            )
        record = {}
        weight = self._working_weight()
        for n in todo:
            adapter = self.adapters[n]
            record[n] = {k: copy.deepcopy(v) for k, v in merges[n].items() if k in adapter.merge_options}
            weight = adapter.merged_weight(weight, **record[n])
        return record, weight

    @torch.no_grad()
    def commit_merge(self, plan: tuple[dict[str, dict[str, Any]], Tensor]) -> None:
        record, weight = plan
        self.view.write_flat_weight(weight)
        self._warn_rounding("merge")
        self.merge_record.update(record)

    def _warn_rounding(self, action: str) -> None:
        if self.view.quantized:
            warnings.warn(rounding_warning(self.view.quantized, action), stacklevel=4)

    def _working_weight(self) -> Tensor:
        """A copy of the flat weight to merge into (fp32 for half-precision layers)."""
        base = self.view.flat_weight().detach()
        return base.float() if base.dtype in (torch.float16, torch.bfloat16) else base.clone()

    @torch.no_grad()
    def unmerge(self) -> dict[str, dict[str, Any]]:
        """Restore the base weight (up to float rounding) by undoing merges in reverse order, each with the
        options it was merged with. Returns the merge record that was undone (``plan_merge`` redoes it)."""
        record = dict(self.merge_record)
        if not record:
            return record
        weight = self._working_weight()
        for n in reversed(record):
            weight = self.adapters[n].unmerged_weight(weight, **record[n])
        self.view.write_flat_weight(weight)
        self._warn_rounding("unmerge")
        self.merge_record.clear()
        return record


class TrainableCopy(Delegating):
    """A module from ``modules_to_save``: the original, frozen, and one trainable copy per adapter."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        self.row_plan: RowPlan | None = None  # set for the duration of a mixed-adapter call

    def add(self, name: str, meta: bool = False) -> None:
        """A trainable copy of the original for adapter ``name`` (``meta``: on the meta device, to be loaded)."""
        self.copies[name] = lowmem.meta_copy(self.original) if meta else copy.deepcopy(self.original)
        if meta:
            lowmem.guard(self, "copies")

    def current(self) -> nn.Module:
        if not self.disabled:
            for n in self.active:
                if n in self.copies:
                    return self.copies[n]
        return self.original

    own = ("original", "copies")

    def delegate(self) -> nn.Module:
        return self.current()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.row_plan is None:
            return self.current()(*args, **kwargs)
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"a mixed-adapter batch needs {type(self.original).__name__} called with its input first")
        x, rest = args[0], args[1:]
        layout = self.row_plan.layout(x.shape[0], x.device, frozenset(self.copies), frozenset(self.copies))

        def run(rows: Tensor, names: tuple[str, ...] = ()) -> Tensor:  # the copy of the row's adapter, if any
            return (self.copies[names[0]] if names else self.original)(rows, *rest, **kwargs)

        return run_segments(layout, x, run, lambda y, rows, names: run(rows, names), run)


# -- targeting ----------------------------------------------------------------------------------------
def iter_wrapped(model: nn.Module, kind: type[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every ``AdapterLayer`` / ``TrainableCopy`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


def _plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules as the user sees them: wrapped layers under their original names, no internals."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, AdapterLayer):
            skip.append(name + ".")
            yield name, module.base_layer
        elif isinstance(module, TrainableCopy):
            skip.append(name + ".")
            yield name, module.original
        else:
            yield name, module


def _is_head(name: str) -> bool:
    return bool(set(OUTPUT_HEADS).intersection(name.split(".")))


def adaptable_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the Linear/Conv1D/Conv2d/Embedding layers, for error messages."""
    seen: dict[str, None] = {}
    for name, module in _plain_modules(model):
        if name and layer_kind(module) is not None:
            seen.setdefault(name.rsplit(".", 1)[-1])
    return list(seen)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``config`` selects, as ``(name, base module)``.

    Raises TargetError when nothing matches (listing what could be targeted), or when a matched module
    is of a type no method can wrap.
    """
    spec = config.target_modules
    if spec is None:
        raise TargetError(
            f"{type(config).__name__}.target_modules is not set; name the layers to adapt, e.g. "
            f"{adaptable_names(model)[:6]}, or use 'all-linear'"
        )
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found, containers = [], []
    for name, module in _plain_modules(model):
        if not name:
            continue
        if spec == "all-linear":
            if layer_kind(module) not in ("linear", "conv1d") or module is out_head or _is_head(name):
                continue
        elif not matching.matches(name, spec, "target_modules"):
            continue
        if matching.matches(name, config.exclude_modules, "exclude_modules"):
            continue
        if config.layers_to_transform is not None:
            if matching.layer_index(name, config.layers_pattern) not in config.layers_to_transform:
                continue
        if layer_kind(module) is None:
            if list(module.children()):
                containers.append(name)  # e.g. `attention.output` when targeting "output"
                continue
            raise TargetError(
                f"target_modules={spec!r} matched {name}, a {type(module).__name__}, which peftlab cannot "
                f"adapt; supported layer types: {SUPPORTED_TYPES}. Name its linear layers instead."
            )
        found.append((name, module))
    if not found:
        extra = ""
        if config.layers_to_transform is not None:
            extra = f" with layers_to_transform={config.layers_to_transform} (layers_pattern={config.layers_pattern!r})"
        if containers:
            extra += f" (only the containers {containers[:3]}, which are not layers)"
        if isinstance(spec, str) and spec != "all-linear":
            extra += f" (a regex must match a whole module name, such as {', '.join(example_names(model))})"
        raise TargetError(
            f"target_modules={spec!r}{extra} matched nothing in {type(model).__name__}; "
            f"layers that can be adapted: {', '.join(adaptable_names(model))}"
        )
    return found


def example_names(model: nn.Module, limit: int = 5) -> list[str]:
    """Full names of adaptable layers, the first one (a linear layer if there is one) under each two-level
    prefix (``model.vision_tower``, ``model.language_model``, ...), for messages about regexes, which match
    whole names."""
    seen: dict[str, str] = {}
    for linear in (True, False):
        for name, module in _plain_modules(model):
            if name and layer_kind(module) is not None and (layer_kind(module) in ("linear", "conv1d")) == linear:
                seen.setdefault(".".join(name.split(".")[:2]), name)
    return list(seen.values())[:limit]


def find_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """Full names of the modules listed in ``modules_to_save`` (suffix match); error if one is missing."""
    if not names:
        return []
    found = []
    for wanted in names:
        hits = [n for n, _ in _plain_modules(model) if n and matching.is_suffix(n, wanted)]
        if not hits:
            top = [n for n, _ in model.named_children()]
            raise TargetError(
                f"modules_to_save entry {wanted!r} matched no module in {type(model).__name__}; "
                f"top-level modules: {top}"
            )
        found.extend(h for h in hits if not any(h.startswith(f + ".") for f in hits if f != h))
    return found


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def adapter_parameters_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in fp32 (or the base dtype if it is wider), also on a bf16/fp16 model."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def new_adapter(
    adapter_cls: type[Adapter], view: LayerView, config: AdapterConfig, r: int, meta: bool = False
) -> Adapter:
    """A new adapter for ``view``'s layer, on its device; ``meta``: on the meta device, uninitialised (its
    init runs on tensors without data, and its warnings, about initial values, are not shown)."""
    weight = view.module.weight
    if not meta:
        return adapter_cls(view, config, r).to(device=weight.device, dtype=adapter_parameters_dtype(weight))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = adapter_cls(view, config, r)
    return adapter.to(dtype=adapter_parameters_dtype(weight))
