"""What a method supplies to the shared plumbing.

A method is a config class (registered with :func:`peftlab.config.register_method`) and an
:class:`Adapter` subclass: the trainable tensors of one adapter on one layer. The plumbing
(:mod:`peftlab.inject`) finds layers, wraps them, switches, merges, saves and loads, for every method.

Two kinds of adapter compose in a wrapped layer with flat weight W (see :mod:`peftlab.layers`):

- *multiplicative* (HRA): W ↦ W·H. It acts on the input, x ↦ x·Hᵀ, before the base layer.
- *additive* (LoRA, HydraLoRA, MTLoRA): y ↦ y + Δ(x), with Δ computed from the layer's input.

With active adapters [m₁, m₂, a₁, a₂] (m multiplicative, a additive, each group in activation order)
the layer computes y = x·(W·H₁·H₂)ᵀ + b + Δ₁(x) + Δ₂(x); merging writes exactly that weight.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from peftlab.batched import BatchedTerm
from peftlab.config import AdapterConfig
from peftlab.errors import MergeError  # noqa: F401  (re-exported: methods raise it)
from peftlab.layers import LayerView

ADAPTERS: dict[str, type[Adapter]] = {}


class Adapter(nn.Module):
    """One adapter on one layer. Subclasses set ``config_class`` and implement the hooks below."""

    config_class: ClassVar[type[AdapterConfig]]
    multiplicative: ClassVar[bool] = False
    # Functions an AdapterModel offers for this method, over its active adapters of the method:
    # name → "sum" (Σ over layers of the adapter's function of that name) or "per_layer" ({layer: value}).
    model_functions: ClassVar[dict[str, str]] = {}
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "conv2d")
    #: keyword options ``merged_weight`` takes (HydraLoRA: ``head_weights``). The wrapped layer records them
    #: per merged adapter and passes them back to ``unmerged_weight``; the adapter keeps no merge state.
    merge_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, layer: LayerView, config: AdapterConfig, r: int) -> None:
        super().__init__()
        self.r = r

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            ADAPTERS[cls.config_class.method] = cls

    @classmethod
    def check_layer(cls, layer: LayerView, r: int, config: AdapterConfig) -> str | None:
        """Why this adapter cannot go on ``layer`` with rank ``r`` (``None`` if it can)."""
        if layer.kind not in cls.supported_kinds:
            return f"{cls.config_class.method} supports {list(cls.supported_kinds)} layers, not {layer.kind}"
        if r > layer.d_in:
            return f"r={r} exceeds the layer's input width d_in={layer.d_in}; use r <= {layer.d_in}"
        return None

    # -- forward ------------------------------------------------------------------------------------
    def transform_input(self, x: Tensor, layer: LayerView) -> Tensor:
        """Multiplicative adapters: x ↦ x·Hᵀ (so the base layer computes x·(W·H)ᵀ)."""
        raise NotImplementedError

    def delta(self, x: Tensor, layer: LayerView) -> Tensor:
        """Δ(x), added to the base output (additive adapters; multiplicative ones on the "lowrank" path)."""
        raise NotImplementedError

    def multiplicative_path(self, x: Tensor, layer: LayerView) -> str:
        """Multiplicative adapters: how this forward applies W·H (all three give the same output).

        ``"activation"``: the base layer on ``transform_input(x)``; ``"weight"``: the layer run with
        ``merged_weight(W)``; ``"lowrank"``: base(x) + ``delta(x)`` with x·(W·H − W)ᵀ written as a
        low-rank product (used only when this is the layer's one active multiplicative adapter).
        """
        return "weight"

    def batched_term(self, layer: LayerView) -> BatchedTerm | None:
        """This adapter's update in a form :mod:`peftlab.batched` stacks with other adapters' to run the rows of
        a mixed-adapter batch at once (computed without gradient, cached until the parameters change).
        ``None`` (the default): rows using it run the grouped path (:mod:`peftlab.mixed`)."""
        return None

    # -- merge ----------------------------------------------------------------------------------------
    def merged_weight(self, weight: Tensor, **options: Any) -> Tensor:
        """W ↦ W' (W·H, or W + ΔW). ``weight`` is a flat (d_out, d_in) tensor.

        ``options`` are the keyword options of ``model.merge(...)`` named in :attr:`merge_options`.
        """
        raise NotImplementedError

    def unmerged_weight(self, weight: Tensor, **options: Any) -> Tensor:
        """The inverse of :meth:`merged_weight`, given the same ``options`` (the layer records them)."""
        raise NotImplementedError

    def example_merge_options(self) -> dict[str, Any]:
        """Valid :attr:`merge_options` values for this adapter (``{}`` when merging needs none).

        Generic code (the contract tests, tools that merge any method) uses them to merge without knowing
        the method; a method with merge options returns a neutral choice (HydraLoRA: uniform head weights).
        """
        return {}

    def materialised(self) -> None:
        """Called after loading gave the parameters new values (``set_adapter_state_dict``, which
        ``from_pretrained`` and ``load_adapter`` use; with ``low_cpu_mem_usage=True`` the parameters were on
        the meta device until then, see :mod:`peftlab.lowmem`): recompute anything derived from them at init
        (a cached tensor). The built-in methods derive nothing, so this does nothing."""

    # -- extras ---------------------------------------------------------------------------------------
    def extra_loss(self) -> Tensor | None:
        """A term added to the training loss (already weighted), or ``None``."""
        return None

    @classmethod
    def diagnostics(cls, state: dict[str, Tensor]) -> dict[str, float]:
        """Numbers worth reporting about one layer's adapter, from its saved tensors (``peftlab inspect``
        prints them per layer); ``state`` maps parameter names (``hra_u``) to tensors."""
        return {}

    @classmethod
    def low_rank_factors(cls, state: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        """One layer's low-rank factors by role, from its saved tensors: ``{"A": [r × d_in], "B": [d_out × r]}``
        for LoRA; a role may hold several matrices (HydraLoRA's B heads). ``peftlab analyze`` compares each role
        across runs. ``{}``: the method has none."""
        return {}
