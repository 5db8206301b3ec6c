"""``AdapterModel``: a model with named adapters, and ``get_adapter_model``.

``AdapterModel`` is an ``nn.Module`` that forwards every call (``forward``, ``generate`` and any
attribute it does not define) to the wrapped model, so HF ``Trainer`` and user loops work unchanged.
Its ``forward`` has the wrapped model's signature, on the instance and on the class (an
``AdapterModel`` around a ``BertForSequenceClassification`` is an ``AdapterModel[BertForSequenceClassification]``,
a subclass made once per wrapped class): HF ``Trainer`` reads it to keep dataset columns
(``remove_unused_columns``), to find the label names and to know whether the model returns a loss.
"""

from __future__ import annotations

import copyreg
import inspect
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from peftlab import lowmem
from peftlab.checkpointing import GradientCheckpointing
from peftlab.config import AdapterConfig
from peftlab.errors import AdapterError, ConfigError, TargetError
from peftlab.inject import (
    AdapterLayer,
    MergeError,
    TrainableCopy,
    find_modules_to_save,
    find_targets,
    iter_wrapped,
    new_adapter,
    set_submodule,
)
from peftlab.layers import LayerView
from peftlab.lora_export import LoraExporting
from peftlab.methods.base import ADAPTERS, Adapter
from peftlab.mixed import mixed_batch
from peftlab.saving import AdapterFiles


class AdapterModel(AdapterFiles, LoraExporting, GradientCheckpointing, nn.Module):
    """A model with one or more named adapters.

    Args:
        model: any ``nn.Module`` (typically a transformers ``PreTrainedModel``).
        config: the first adapter's config (optional: adapters can be added later).
        adapter_name: its name.
    """

    _hf_peft_config_loaded = True  # transformers' mark of trainable adapters: HF Trainer then trains a quantized base

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, AdapterModel):
            raise TypeError("model is already an AdapterModel; use model.add_adapter(name, config) instead")
        self.__class__ = _with_forward_of(type(self), type(model))
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        self.trainable = True
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            function = self._method_function(name)  # e.g. model.orthogonality_loss() when HRA is registered
            return function if function is not None else getattr(self.base_model, name)

    def forward(self, *args: Any, adapter_names: list[str | list[str]] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward (with its signature: see the module docstring). ``adapter_names``: one
        entry per row (a name, ``"__base__"`` or a list to compose), a mixed-adapter batch (:mod:`peftlab.mixed`)."""
        with mixed_batch(self, adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle and deepcopy rebuild the per-wrapped-class subclass instead of looking it up by name."""
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        if "_forward_of" not in vars(cls) or reduced[0] is not copyreg.__newobj__:
            return reduced
        return (_new_with_forward_of, (cls.__base__, cls._forward_of), *reduced[2:])

    def generate(self, *args: Any, adapter_names: list[str | list[str]] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; ``adapter_names`` as in :meth:`forward` (beams and returned sequences
        of a row use its entry)."""
        with mixed_batch(self, adapter_names, args, kwargs):
            return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def active_adapter(self) -> str | None:
        return self.active_adapters[0] if self.active_adapters else None

    # -- adapters ----------------------------------------------------------------------------------------
    def _layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        return iter_wrapped(self.base_model, AdapterLayer)  # type: ignore[return-value]

    def _copies(self) -> Iterator[tuple[str, TrainableCopy]]:
        return iter_wrapped(self.base_model, TrainableCopy)  # type: ignore[return-value]

    def add_adapter(self, adapter_name: str, config: AdapterConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add an adapter (not activated: call :meth:`set_adapter`). Nothing changes if a check fails.
        ``low_cpu_mem_usage=True``: on the meta device until :meth:`set_adapter_state_dict` (:mod:`peftlab.lowmem`)."""
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be an AdapterConfig (e.g. HRAConfig), got {type(config).__name__}")
        if not adapter_name or "." in adapter_name:
            raise AdapterError(f"adapter name {adapter_name!r} must be non-empty and contain no '.'")
        if adapter_name in self.peft_config:
            raise AdapterError(
                f"an adapter named {adapter_name!r} exists already; delete_adapter() it or pick a new name"
            )
        adapter_cls = ADAPTERS.get(config.method)
        if adapter_cls is None:
            raise ConfigError(f"no adapter implementation is registered for method {config.method!r}")
        config.validate()
        if config.unresolved_fields():
            raise ConfigError(
                f"{type(config).__name__} fields {config.unresolved_fields()} depend on the training data; call "
                "config = config.resolve(lambda: training_texts) first (peftlab train does this)"
            )
        if config.bias != "none":
            for other, other_config in self.peft_config.items():
                if other_config.bias != "none":
                    raise AdapterError(
                        f"adapter {adapter_name!r} has bias={config.bias!r}, but adapter {other!r} already trains "
                        f"the model's biases (bias={other_config.bias!r}); the biases are shared, so only one "
                        "adapter may train them. Use bias='none' for one of the two."
                    )
        targets = find_targets(self.base_model, config)
        saved = find_modules_to_save(self.base_model, config.modules_to_save)
        plans = []
        for name, module in targets:  # check everything before touching the model
            view = LayerView(module, name)
            r = config.rank_for(name)
            problem = adapter_cls.check_layer(view, r, config)
            if problem:
                raise TargetError(f"cannot put a {config.method} adapter on {name}: {problem}")
            weight = view.flat_weight().detach()  # dequantized for a quantized layer
            if not weight.is_meta and not torch.isfinite(weight).all():
                raise TargetError(f"{name}'s weight holds NaN or inf values; the base model is corrupt")
            plans.append((name, module, view, r))
        for name, module, view, r in plans:
            layer = self.base_model.get_submodule(name)
            if not isinstance(layer, AdapterLayer):
                layer = AdapterLayer(module, name)
                set_submodule(self.base_model, name, layer)
            layer.adapters[adapter_name] = new_adapter(adapter_cls, view, config, r, meta=low_cpu_mem_usage)
            if low_cpu_mem_usage:
                lowmem.guard(layer, "adapters")
        for name in saved:
            wrapper = self.base_model.get_submodule(name)
            if not isinstance(wrapper, TrainableCopy):
                wrapper = TrainableCopy(wrapper)
                set_submodule(self.base_model, name, wrapper)
            wrapper.add(adapter_name, meta=low_cpu_mem_usage)
        self.peft_config[adapter_name] = config
        self._update_trainable()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter, or several (composed in list order, see :mod:`peftlab.methods.base`).

        Adapters active together may not both list a module in ``modules_to_save`` (only one copy can run).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"no adapter named {unknown[0]!r}; adapters: {list(self.peft_config)}")
        for _, layer in self._layers():
            if layer.merged:
                raise MergeError("cannot switch adapters while some are merged; call unmerge() first")
        for module_name, wrapper in self._copies():
            sharing = [n for n in names if n in wrapper.copies]
            if len(sharing) > 1:
                raise AdapterError(
                    f"adapters {sharing} each have their own copy of {module_name} (modules_to_save), and only one "
                    "copy can run, so they cannot be active together. Activate them one at a time, or give only "
                    "one of them that module in modules_to_save."
                )
        self._activate(names)

    def _activate(self, names: list[str]) -> None:
        self.active_adapters = names
        for _, module in (*self._layers(), *self._copies()):
            module.active = [
                n for n in names if n in (module.adapters if isinstance(module, AdapterLayer) else module.copies)
            ]
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; layers left with no adapter become plain layers again.

        If it was active, the other active adapters stay active; if it was the only active one, the first
        remaining adapter (in the order they were added) becomes active, with a warning, as in HF PEFT.
        With no adapter left, the model runs as the base model.
        """
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        for name, layer in list(self._layers()):
            if adapter_name in layer.merged:
                raise MergeError(f"adapter {adapter_name!r} is merged into {name}; call unmerge() first")
            if adapter_name in layer.adapters:
                del layer.adapters[adapter_name]
                layer.active = [n for n in layer.active if n != adapter_name]
            if not len(layer.adapters):
                set_submodule(self.base_model, name, layer.base_layer)
        for name, wrapper in list(self._copies()):
            if adapter_name in wrapper.copies:
                del wrapper.copies[adapter_name]
                wrapper.active = [n for n in wrapper.active if n != adapter_name]
            if not len(wrapper.copies):
                set_submodule(self.base_model, name, wrapper.original)
        del self.peft_config[adapter_name]
        active = [n for n in self.active_adapters if n != adapter_name]
        if not active and adapter_name in self.active_adapters and self.peft_config:
            active = [next(iter(self.peft_config))]
            warnings.warn(
                f"adapter {adapter_name!r}, the active one, was deleted; {active[0]!r} is now active "
                "(call set_adapter() to choose another)",
                stacklevel=2,
            )
        self._activate(active)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block.

        Merged adapters are unmerged on entry and merged again on exit with the options they were merged
        with (e.g. HydraLoRA's ``head_weights``). As in HF PEFT, the adapter parameters and
        ``modules_to_save`` copies are frozen (``requires_grad=False``) inside the block and trainable again
        after it. Biases trained with ``bias="all"`` / ``"<method>_only"`` live in the base layers, so
        inside the block the model runs the trained biases, not the original ones (PEFT warns; so does this).
        """
        biased = [n for n in self.active_adapters if self.peft_config[n].bias != "none"]
        if biased:
            warnings.warn(
                f"adapter {biased[0]!r} trains the model's biases (bias={self.peft_config[biased[0]].bias!r}); "
                "disable_adapter() keeps the trained biases, so the output is not exactly the base model's",
                stacklevel=3,
            )
        records = [(layer, layer.unmerge()) for _, layer in self._layers()]
        modules = [m for _, m in (*self._layers(), *self._copies())]
        for m in modules:
            m.disabled = True
            (m.adapters if isinstance(m, AdapterLayer) else m.copies).requires_grad_(False)
        try:
            yield
        finally:
            for m in modules:
                m.disabled = False
            self._update_trainable()
            self._commit_merges((layer, layer.plan_merge(record)) for layer, record in records if record)

    def _trainable_biases(self, adapter_names: list[str] | None = None) -> set[str]:
        """Names (as in the wrapped model) of the biases the adapters (default: the active ones) train."""
        names: set[str] = set()
        for adapter_name in self.active_adapters if adapter_names is None else adapter_names:
            mode = self.peft_config[adapter_name].bias
            if mode == "all":
                names |= {
                    n for n, _ in self.base_model.named_parameters() if n.endswith("bias") and ".adapters." not in n
                }
            elif mode.endswith("_only"):
                for layer_name, layer in self._layers():
                    if adapter_name in layer.adapters and getattr(layer.base_layer, "bias", None) is not None:
                        names.add(f"{layer_name}.base_layer.bias")
        return {n for n in names if ".copies." not in n and ".original." not in n}

    def _update_trainable(self) -> None:
        active = set(self.active_adapters)
        biases = self._trainable_biases() if self.trainable else set()
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(name in biases)
        for _, layer in self._layers():
            for adapter_name, adapter in layer.adapters.items():
                adapter.requires_grad_(self.trainable and adapter_name in active)
        for _, wrapper in self._copies():
            for adapter_name, module in wrapper.copies.items():
                module.requires_grad_(self.trainable and adapter_name in active)

    # -- merging -----------------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False, **options: Any) -> None:
        """Fold adapters (default: the active ones) into the base weights.

        With ``safe_merge=True`` a result holding NaN/inf raises :class:`MergeError` and every layer is
        left as it was. ``options`` go to the methods that declare them (e.g. HydraLoRA's ``head_weights``);
        each layer records them, so unmerge and ``disable_adapter`` use the same ones.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        methods = {self.peft_config[n].method for n in names if n in self.peft_config}
        accepted = {option for method in methods for option in ADAPTERS[method].merge_options}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise MergeError(
                f"merge option(s) {unknown} are not used by adapter(s) {names}; options their methods take: "
                f"{sorted(accepted) or 'none'}"
            )
        self._check_loaded(names, "merge")
        merges = {n: options for n in names}
        if not safe_merge:  # layer by layer (no second copy of every weight)
            self._commit_merges((layer, layer.plan_merge(merges)) for _, layer in self._layers())
            return
        plans = [(name, layer, plan) for name, layer in self._layers() if (plan := layer.plan_merge(merges))]
        for name, _, (record, weight) in plans:  # check every layer before writing any
            if not torch.isfinite(weight).all():
                raise MergeError(
                    f"merging adapter(s) {list(record)} into {name} gives non-finite values (NaN/inf); no weight "
                    "was changed. Check the adapter weights for NaN."
                )
        for _, layer, plan in plans:
            layer.commit_merge(plan)

    @staticmethod
    def _commit_merges(plans: Iterable[tuple[AdapterLayer, Any]]) -> None:
        """Commit ``(layer, plan)`` pairs as they come (plans may be built lazily); undone if one fails."""
        done: list[AdapterLayer] = []
        try:
            for layer, plan in plans:
                if plan:
                    layer.commit_merge(plan)
                    done.append(layer)
        except Exception:
            for layer in done:
                layer.unmerge()
            raise

    def unmerge(self) -> None:
        """Undo every merge: the base weights are restored up to float rounding."""
        for _, layer in self._layers():
            layer.unmerge()

    @property
    def merged_adapters(self) -> list[str]:
        return sorted({n for _, layer in self._layers() for n in layer.merged})

    def merge_and_unload(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False, **options: Any
    ) -> nn.Module:
        """Merge, then return the plain model (modules_to_save replaced by the active adapter's copy)."""
        self.merge(adapter_names, safe_merge=safe_merge, **options)
        return self._strip(keep_copies=True)

    def unload(self) -> nn.Module:
        """Return the original model: adapters removed without merging (merged ones are undone first)."""
        self.unmerge()
        return self._strip(keep_copies=False)

    def _strip(self, keep_copies: bool) -> nn.Module:
        for name, layer in list(self._layers()):
            set_submodule(self.base_model, name, layer.base_layer)
        for name, wrapper in list(self._copies()):
            set_submodule(self.base_model, name, wrapper.current() if keep_copies else wrapper.original)
        self.peft_config.clear()
        self.active_adapters = []
        return self.base_model

    # -- losses --------------------------------------------------------------------------------------------
    def _active_adapters(self) -> Iterator[tuple[str, Adapter]]:
        """(layer name, adapter) for every active, not disabled adapter."""
        for layer_name, layer in self._layers():
            if not layer.disabled:
                for name in layer.active:
                    yield layer_name, layer.adapters[name]

    def extra_loss(self) -> Tensor:
        """Σ of every active adapter's extra loss term (HRA's orthogonality, HydraLoRA's balance, ...)."""
        terms = [t for _, a in self._active_adapters() if (t := a.extra_loss()) is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else torch.zeros(())

    def _method_function(self, name: str) -> Any:
        """A method's model-level function (``Adapter.model_functions``, e.g. HRA's ``orthogonality_loss``,
        HydraLoRA's ``routing_stats``) over the active adapters of every method that declares it, or ``None``."""
        kinds = {cls.model_functions[name] for cls in ADAPTERS.values() if name in cls.model_functions}
        if not kinds:
            return None
        (kind,) = kinds

        def over_active_adapters() -> Any:
            found = {layer: getattr(adapter, name)() for layer, adapter in self._active_adapters()
                     if name in type(adapter).model_functions}
            if kind == "per_layer":
                return found
            return torch.stack([v.float() for v in found.values()]).sum() if found else torch.zeros(())

        over_active_adapters.__name__ = name
        over_active_adapters.__doc__ = next(
            getattr(cls, name).__doc__ for cls in ADAPTERS.values() if name in cls.model_functions
        )
        return over_active_adapters

    # -- parameters ----------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; total includes the adapters and modules_to_save copies."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


_FORWARD_CLASSES: dict[tuple[type, type], type] = {}


def _with_forward_of(adapter_cls: type[AdapterModel], wrapped_cls: type[nn.Module]) -> type[AdapterModel]:
    """The subclass of ``adapter_cls`` whose ``forward`` has ``wrapped_cls.forward``'s signature (made once)."""
    while "_forward_of" in vars(adapter_cls):  # re-wrapping: start again from the user-facing class
        adapter_cls = adapter_cls.__base__
    key = (adapter_cls, wrapped_cls)
    if key not in _FORWARD_CLASSES:

        def forward(self: AdapterModel, *args: Any, **kwargs: Any) -> Any:
            return AdapterModel.forward(self, *args, **kwargs)

        forward.__doc__ = f"{wrapped_cls.__name__}.forward, with the active adapters."
        try:
            forward.__signature__ = inspect.signature(wrapped_cls.forward)  # type: ignore[attr-defined]
        except (TypeError, ValueError):  # a forward inspect cannot read keeps (*args, **kwargs)
            pass
        name = f"{adapter_cls.__name__}[{wrapped_cls.__name__}]"
        attrs = {"forward": forward, "_forward_of": wrapped_cls, "__module__": adapter_cls.__module__}
        _FORWARD_CLASSES[key] = type(name, (adapter_cls,), {**attrs, "__qualname__": name})
    return _FORWARD_CLASSES[key]


def _new_with_forward_of(adapter_cls: type[AdapterModel], wrapped_cls: type[nn.Module]) -> AdapterModel:
    """An empty instance of the subclass (for unpickling; the state is set afterwards)."""
    cls = _with_forward_of(adapter_cls, wrapped_cls)
    return cls.__new__(cls)


def get_adapter_model(
    model: nn.Module, config: AdapterConfig, adapter_name: str = "default", low_cpu_mem_usage: bool = False
) -> AdapterModel:
    """Wrap ``model`` with a new adapter: only the adapter (plus ``modules_to_save``/biases) trains.
    ``low_cpu_mem_usage=True``: on the meta device, no values, until ``model.set_adapter_state_dict(tensors)``."""
    wrapped = AdapterModel(model, adapter_name=adapter_name)
    wrapped.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
    wrapped.set_adapter(adapter_name)
    return wrapped
