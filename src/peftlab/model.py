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
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftlab import io
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
from peftlab.methods.base import ADAPTERS, Adapter

TRAINER_STATE_NAME = "trainer_state.json"  # HF Trainer checkpoints hold one; adapter folders do not


def _original_name(name: str) -> str:
    """``a.query.base_layer.bias`` → ``a.query.bias``; ``cls.original.weight`` → ``cls.weight``."""
    return name.replace(".base_layer.", ".").replace(".original.", ".")


class AdapterModel(nn.Module):
    """A model with one or more named adapters.

    Args:
        model: any ``nn.Module`` (typically a transformers ``PreTrainedModel``).
        config: the first adapter's config (optional: adapters can be added later).
        adapter_name: its name.
    """

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
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward (with its signature: see the module docstring)."""
        return self.base_model(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle and deepcopy rebuild the per-wrapped-class subclass instead of looking it up by name."""
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        if "_forward_of" not in vars(cls) or reduced[0] is not copyreg.__newobj__:
            return reduced
        return (_new_with_forward_of, (cls.__base__, cls._forward_of), *reduced[2:])

    def generate(self, *args: Any, **kwargs: Any) -> Any:
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

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Add an adapter (not activated: call :meth:`set_adapter`). Nothing changes if a check fails."""
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
            if not torch.isfinite(view.flat_weight().detach()).all():
                raise TargetError(f"{name}'s weight holds NaN or inf values; the base model is corrupt")
            plans.append((name, module, view, r))
        for name, module, view, r in plans:
            layer = self.base_model.get_submodule(name)
            if not isinstance(layer, AdapterLayer):
                layer = AdapterLayer(module, name)
                set_submodule(self.base_model, name, layer)
            layer.adapters[adapter_name] = new_adapter(adapter_cls, view, config, r)
        for name in saved:
            wrapper = self.base_model.get_submodule(name)
            if not isinstance(wrapper, TrainableCopy):
                wrapper = TrainableCopy(wrapper)
                set_submodule(self.base_model, name, wrapper)
            wrapper.add(adapter_name)
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

    def _trainable_biases(self) -> set[str]:
        """Names (as in the wrapped model) of the biases the active adapters train."""
        names: set[str] = set()
        for adapter_name in self.active_adapters:
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
    def _active_modules(self) -> Iterator[Adapter]:
        for _, layer in self._layers():
            if not layer.disabled:
                for name in layer.active:
                    yield layer.adapters[name]

    def extra_loss(self) -> Tensor:
        """Σ of every active adapter's extra loss term (HRA's orthogonality, HydraLoRA's balance, ...)."""
        terms = [t for a in self._active_modules() if (t := a.extra_loss()) is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else torch.zeros(())

    def orthogonality_loss(self) -> Tensor:
        """HRA: λ·Σ_layers ‖I − ÛᵀÛ‖²_F over the active HRA adapters (0 without HRA)."""
        terms = [a.orthogonality_loss() for a in self._active_modules() if hasattr(a, "orthogonality_loss")]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def routing_stats(self) -> dict[str, Tensor]:
        """Routed methods (HydraLoRA): per adapted layer, the mean router weight ω per head over the last forward."""
        return {
            name: layer.adapters[a].routing_stats()
            for name, layer in self._layers()
            for a in layer.active
            if hasattr(layer.adapters[a], "routing_stats")
        }

    # -- parameters ----------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; total includes the adapters and modules_to_save copies."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The tensors that make up one adapter, keyed as in the unwrapped model.

        Keys: ``<layer>.<parameter>`` for adapter tensors (e.g. ``...query.hra_u``), the module's own
        names for ``modules_to_save`` copies (``classifier.weight``) and trained biases.
        """
        adapter_name = adapter_name or self.active_adapter
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        state: dict[str, Tensor] = {}
        for layer_name, layer in self._layers():
            if adapter_name in layer.adapters:
                for key, value in layer.adapters[adapter_name].state_dict().items():
                    state[f"{layer_name}.{key}"] = value
        for name, wrapper in self._copies():
            if adapter_name in wrapper.copies:
                for key, value in wrapper.copies[adapter_name].state_dict().items():
                    state[f"{name}.{key}"] = value
        if self.peft_config[adapter_name].bias != "none":
            params = dict(self.base_model.named_parameters())
            active, self.active_adapters = self.active_adapters, [adapter_name]
            try:
                for name in self._trainable_biases():
                    state[_original_name(name)] = params[name]
            finally:
                self.active_adapters = active
        return state

    def _adapter_params(self, adapter_name: str) -> dict[str, Tensor]:
        """Same keys as :meth:`adapter_state_dict`, mapped to the live tensors (for loading)."""
        live = {}
        for layer_name, layer in self._layers():
            if adapter_name in layer.adapters:
                for key, value in layer.adapters[adapter_name].state_dict(keep_vars=True).items():
                    live[f"{layer_name}.{key}"] = value
        for name, wrapper in self._copies():
            if adapter_name in wrapper.copies:
                for key, value in wrapper.copies[adapter_name].state_dict(keep_vars=True).items():
                    live[f"{name}.{key}"] = value
        params = {_original_name(n): p for n, p in self.base_model.named_parameters()}
        for key in self.adapter_state_dict(adapter_name):
            live.setdefault(key, params.get(key))
        return live

    # -- saving and loading ----------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        format: str = "peftlab",
        is_main_process: bool = True,
        **_: Any,
    ) -> None:
        """Write each adapter (``default`` at the top, others in sub-folders named after them, as HF PEFT
        does); :meth:`from_pretrained` loads them all back.

        ``format="peft"`` writes files that ``peft.PeftModel.from_pretrained`` loads (HRA and LoRA).
        """
        if not is_main_process:
            return
        if format not in ("peftlab", "peft"):
            raise ConfigError(f"format={format!r}: use 'peftlab' or 'peft'")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            folder = Path(save_directory) if name == "default" else Path(save_directory) / name
            if format == "peft":
                from peftlab.interop import save_peft_adapter

                save_peft_adapter(self, folder, name)
                continue
            config = self.peft_config[name].to_dict()
            config["base_model_name_or_path"] = getattr(getattr(self.base_model, "config", None), "name_or_path", None)
            io.save_tensors(folder / io.WEIGHTS_NAME, self.adapter_state_dict(name), metadata={"format": "pt"})
            io.atomic_write_json(folder / io.CONFIG_NAME, config)

    def load_adapter(self, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Add the adapter saved in ``path`` under ``adapter_name`` (checks names, shapes, finiteness)."""
        data = io.read_json(Path(path) / io.CONFIG_NAME)
        data.pop("base_model_name_or_path", None)
        if "peft_type" in data and "method" not in data:
            raise io.AdapterLoadError(
                f"{path} holds an HF PEFT adapter; load it with peftlab.interop.load_peft_adapter(model, path)"
            )
        config = AdapterConfig.from_dict(data)
        tensors = io.load_tensors(path)
        self.add_adapter(adapter_name, config)
        try:
            io.check_and_copy(self._adapter_params(adapter_name), tensors, path)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self.trainable = is_trainable
        self._update_trainable()

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> AdapterModel:
        """Wrap ``model`` with every adapter saved in ``path`` (inference mode unless ``is_trainable``).

        ``path`` is laid out as :meth:`save_pretrained` (and HF PEFT) writes it: the adapter at the top is
        loaded as ``adapter_name``, each sub-folder holding an adapter under the sub-folder's name. The top
        adapter is active (``default`` for a folder from ``save_pretrained``); a folder with adapters in
        sub-folders only activates the first by name. Use :meth:`set_adapter` to switch. Sub-folders that
        hold a ``trainer_state.json`` are training checkpoints, not adapters of this folder, and are
        skipped. If one adapter fails to load, none stays on ``model``.
        """
        folders = _adapter_folders(Path(path), adapter_name)
        wrapped = cls(model)
        try:
            for name, folder in folders.items():
                wrapped.load_adapter(folder, name, is_trainable=is_trainable)
        except Exception:
            for name in list(wrapped.peft_config):
                wrapped.delete_adapter(name)
            raise
        wrapped.set_adapter(next(iter(folders)))
        if not is_trainable:
            wrapped.eval()
        return wrapped


def _adapter_folders(path: Path, top_name: str) -> dict[str, Path]:
    """name → folder of the adapters in ``path``: its top (as ``top_name``), then its sub-folders by name."""
    found = {top_name: path} if (path / io.CONFIG_NAME).is_file() else {}
    subfolders = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    for sub in subfolders:
        if "." not in sub.name and (sub / io.CONFIG_NAME).is_file() and not (sub / TRAINER_STATE_NAME).exists():
            found.setdefault(sub.name, sub)
    return found or {top_name: path}  # nothing there: loading the top gives the error that says so


_FORWARD_CLASSES: dict[tuple[type, type], type] = {}


def _with_forward_of(adapter_cls: type[AdapterModel], wrapped_cls: type[nn.Module]) -> type[AdapterModel]:
    """The subclass of ``adapter_cls`` whose ``forward`` has ``wrapped_cls.forward``'s signature (made once)."""
    while "_forward_of" in vars(adapter_cls):  # re-wrapping: start again from the user-facing class
        adapter_cls = adapter_cls.__base__
    key = (adapter_cls, wrapped_cls)
    if key not in _FORWARD_CLASSES:

        def forward(self: AdapterModel, *args: Any, **kwargs: Any) -> Any:
            return self.base_model(*args, **kwargs)

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


def get_adapter_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdapterModel:
    """Wrap ``model`` with a new adapter: only the adapter (plus ``modules_to_save``/biases) trains."""
    return AdapterModel(model, config, adapter_name)
