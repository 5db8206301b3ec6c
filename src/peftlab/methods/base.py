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
from peftlab.errors import UnsupportedError
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

    def lora_factors(self, weight: Tensor, **options: Any) -> tuple[Tensor, Tensor]:
        """This adapter as a plain LoRA of scaling 1: (A, B), flat (ρ, d_in) and (d_out, ρ), with
        ``merged_weight(weight, **options)`` = weight + B·A exactly (:mod:`peftlab.lora_export` writes them).

        ``weight`` is the flat weight this adapter acts on, in float64: for a multiplicative adapter, W times
        the multiplicative adapters before it. Compute in ``weight.dtype``. Raises :class:`UnsupportedError`
        (saying why) when the update is not a fixed low-rank matrix.
        """
        raise UnsupportedError(f"{self.config_class.method} adapters have no LoRA form (no lora_factors)")

    def materialised(self) -> None:
        """Called after loading gave the parameters new values (``set_adapter_state_dict``, which
        ``from_pretrained`` and ``load_adapter`` use; with ``low_cpu_mem_usage=True`` the parameters were on
        the meta device until then, see :mod:`peftlab.lowmem`): recompute anything derived from them at init
        (a cached tensor). The built-in methods derive nothing, so this does nothing."""

    # -- extras ---------------------------------------------------------------------------------------
    def extra_loss(self) -> Tensor | None:
        """A term added to the training loss (already weighted), or ``None``."""
        return None

    def checkpointing_problem(self, reentrant: bool) -> str | None:
        """Why this adapter cannot train under gradient checkpointing (``reentrant``: ``use_reentrant=True``, whose
        first forward runs without autograd), with what to do instead; ``None`` if it can."""
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


# -- does a saved adapter fit its own config? -------------------------------------------------------------------------
PROBE_WIDTHS = (1031, 1033)  # d_in, d_out of the probe layer: primes that no rank-derived size is likely to equal


def _probe_shapes(adapter_cls: type[Adapter], config: AdapterConfig, r: int) -> dict[str, tuple[int, ...]] | None:
    """Each parameter's shape of ``adapter_cls`` with rank ``r`` on a probe linear layer (None: cannot be built)."""
    import warnings

    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. HRA's odd-r init notice: only the shapes are wanted
            adapter = adapter_cls(LayerView(nn.Linear(*PROBE_WIDTHS, bias=False)), config, r)
    except (ValueError, TypeError, RuntimeError):
        return None
    return {name: tuple(value.shape) for name, value in adapter.state_dict().items()}


def _fits(expected: tuple[int, ...], saved: tuple[int, ...]) -> bool:
    """Whether a saved shape can be ``expected`` on some layer: the layer widths (the probe's) may be anything."""
    return len(expected) == len(saved) and all(e in PROBE_WIDTHS or e == s
                                               for e, s in zip(expected, saved, strict=True))


def config_mismatch(config: AdapterConfig, tensors: dict[str, Tensor]) -> str | None:
    """Why ``tensors`` (a saved adapter, keys ``<module>.<parameter>``) cannot have been made with ``config``, on any
    base model; ``None`` when that is not certain (then a shape error on loading is the base model's).

    For each module the method's adapter is built on a probe linear layer (widths :data:`PROBE_WIDTHS`): in its
    parameter shapes the layer widths may be anything, every other size must equal the saved one. A module is
    reported only when its tensors do not fit the config's rank for it (``rank_for``) but all fit another rank k
    ("the weights have rank k"): sizes that depend on the layer itself (MTLoRA's fused slices) never give a false
    alarm.
    """
    adapter_cls = ADAPTERS.get(config.method)
    probes: dict[int, dict[str, tuple[int, ...]] | None] = {}

    def fits(r: int, state: dict[str, tuple[int, ...]]) -> bool:
        shapes = probes[r] if r in probes else probes.setdefault(r, _probe_shapes(adapter_cls, config, r))
        return shapes is not None and all(_fits(shapes.get(n, ()), shape) for n, shape in state.items())

    if adapter_cls is None or (names := _probe_shapes(adapter_cls, config, config.r)) is None:
        return None
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in tensors.items():  # modules_to_save copies and trained biases match no parameter name
        name = next((n for n in names if key.endswith("." + n)), None)
        if name is not None:
            modules.setdefault(key[: -len(name) - 1], {})[name] = tuple(value.shape)
    for module in sorted(modules):
        state, r = modules[module], config.rank_for(module)
        if fits(r, state):
            continue
        sizes = {size // m for shape in state.values() for size in shape for m in range(1, 9) if size % m == 0}
        found = next((k for k in sorted(sizes - {r}) if fits(k, state)), None)
        if found is not None:
            saved = ", ".join(f"{n} {list(shape)}" for n, shape in sorted(state.items()))
            return (f"the config says r={r} but the weights have rank {found} (module {module}: {saved}): the "
                    "adapter_config.json does not match the saved weights (adapter_model.safetensors); restore the "
                    f"config the adapter was saved with (r={found})")
    return None
