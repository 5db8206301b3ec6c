"""Saving and loading an ``AdapterModel``'s adapters: peftlab's folders and HF PEFT's, one code path.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (:mod:`peftlab.files` writes
them atomically and reads them safely). A model with several adapters saves the ``default`` one at the top
and the others in sub-folders named after them, as HF PEFT does; :meth:`AdapterFiles.from_pretrained`
loads them all back. A folder written by HF PEFT loads through the same methods: its config and tensor
layout are translated by the pure converters in :mod:`peftlab.peft_format`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Self

from peftlab import files, lowmem, peft_format, sharded
from peftlab.config import AdapterConfig
from peftlab.errors import AdapterError, AdapterLoadError, ConfigError
from peftlab.methods import config_from_dict
from peftlab.methods.base import Adapter, config_mismatch

TRAINER_STATE_NAME = "trainer_state.json"  # HF Trainer checkpoints hold one; adapter folders do not
FORMATS = ("peftlab", "peft")


def original_name(name: str) -> str:
    """``a.query.base_layer.bias`` → ``a.query.bias``; ``cls.original.weight`` → ``cls.weight``."""
    return name.replace(".base_layer.", ".").replace(".original.", ".")


class AdapterFiles:
    """The saving and loading half of :class:`peftlab.AdapterModel` (a mixin: it uses the model's adapters)."""

    def _owners(self, adapter_name: str) -> Iterator[tuple[str, nn.Module, nn.Module, torch.device]]:
        """(module name, wrapper, the adapter's module in it, the device its tensors belong on) for every
        wrapped layer and ``modules_to_save`` wrapper holding adapter ``adapter_name``."""
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        for name, layer in self._layers():
            if adapter_name in layer.adapters:
                yield name, layer, layer.adapters[adapter_name], layer.base_layer.weight.device
        for name, wrapper in self._copies():
            if adapter_name in wrapper.copies:
                real = next(itertools.chain(wrapper.original.parameters(), wrapper.original.buffers()), None)
                device = real.device if real is not None else torch.device("cpu")
                yield name, wrapper, wrapper.copies[adapter_name], device

    def _check_loaded(self, adapter_names: list[str], action: str) -> None:
        """:class:`AdapterError` if one of the adapters is still on the meta device (see :mod:`peftlab.lowmem`)."""
        for adapter_name in adapter_names:
            if adapter_name in self.peft_config:
                for _, _, module, _ in self._owners(adapter_name):
                    if lowmem.on_meta(module):
                        raise AdapterError(lowmem.unloaded_message(adapter_name, action))

    def _tensors(self, adapter_name: str, live: bool) -> dict[str, Tensor]:
        """One adapter's tensors keyed as in the unwrapped model; ``live``: the parameters themselves."""
        state: dict[str, Tensor] = {}
        for owner, _, module, _ in self._owners(adapter_name):
            for key, value in module.state_dict(keep_vars=live).items():
                state[f"{owner}.{key}"] = value
        if self.peft_config[adapter_name].bias != "none":
            params = dict(self.base_model.named_parameters())
            for name in self._trainable_biases([adapter_name]):
                state[original_name(name)] = params[name]
        return state

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The tensors that make up one adapter (default: the active one), keyed as in the unwrapped model.

        Keys: ``<layer>.<parameter>`` for adapter tensors (e.g. ``...query.hra_u``), the module's own
        names for ``modules_to_save`` copies (``classifier.weight``) and trained biases.
        """
        return self._tensors(adapter_name or self.active_adapter, live=False)

    def adapter_parameters(self, adapter_name: str) -> dict[str, Tensor]:
        """Same keys as :meth:`adapter_state_dict`, mapped to the live tensors (what loading copies into)."""
        return self._tensors(adapter_name, live=True)

    def set_adapter_state_dict(
        self, tensors: dict[str, Tensor], adapter_name: str | None = None, source: str = "the state dict"
    ) -> None:
        """Load ``tensors`` (keyed as :meth:`adapter_state_dict` gives them) into adapter ``adapter_name``
        (default: the active one), after checking that the keys and shapes match exactly.

        An adapter made with ``low_cpu_mem_usage=True`` (on the meta device) takes the tensors themselves,
        moved to its layer's device and converted to its dtype only where they differ, so nothing is
        allocated twice (they then share memory with ``tensors``); an ordinary adapter gets them copied in.
        Adapters partitioned by DeepSpeed ZeRO-3 are gathered, written and re-partitioned (a collective: call it
        on every process, with the same tensors).
        """
        name = adapter_name or self.active_adapter
        params = self.adapter_parameters(name)
        with sharded.gathered(params.values(), modify=True):  # ZeRO-3: into the full tensors, re-partitioned after
            try:
                files.check_matching(params, tensors, source)
            except AdapterLoadError:  # the config and the weights may disagree whatever the base model: say so
                reason = config_mismatch(self.peft_config[name], tensors)
                if reason is None:
                    raise
                raise AdapterLoadError(f"{source}: {reason}") from None
            done: set[str] = set()
            for owner, wrapper, module, device in self._owners(name):
                keys = module.state_dict().keys()
                lowmem.materialise(module, {key: tensors[f"{owner}.{key}"] for key in keys}, device)
                done.update(f"{owner}.{key}" for key in keys)
                if isinstance(module, Adapter):
                    module.materialised()
                lowmem.unguard_if_loaded(wrapper, "adapters" if isinstance(module, Adapter) else "copies")
            with torch.no_grad():  # trained biases: parameters of the base model, always real
                for key in params.keys() - done:
                    params[key].copy_(tensors[key].to(device=params[key].device, dtype=params[key].dtype))

    # -- saving ----------------------------------------------------------------------------------------------
    def _state_keys(self, adapter_name: str) -> dict[str, str]:
        """adapter key (as :meth:`adapter_state_dict` gives it) → key of the same tensor in ``self.state_dict()``."""
        paths = {id(module): path for path, module in self.named_modules()}
        keys: dict[str, str] = {}
        for owner, _, module, _ in self._owners(adapter_name):
            for key in module.state_dict():
                keys[f"{owner}.{key}"] = f"{paths[id(module)]}.{key}"
        if self.peft_config[adapter_name].bias != "none":
            for name in self._trainable_biases([adapter_name]):
                keys[original_name(name)] = f"base_model.{name}"
        return keys

    def _tensors_to_save(
        self, adapter_name: str, state_dict: dict[str, Tensor] | None
    ) -> dict[str, Tensor]:
        """One adapter's full tensors: picked from ``state_dict`` if given, else gathered from the (possibly
        sharded) parameters (a collective); :class:`AdapterError` if one has not its declared shape."""
        live = self.adapter_parameters(adapter_name)
        if state_dict is not None:
            tensors = sharded.pick(state_dict, self._state_keys(adapter_name), adapter_name)
        else:
            tensors = sharded.full_tensors(live)
        sharded.check_full_shapes(tensors, {k: sharded.declared_shape(v) for k, v in live.items()}, adapter_name)
        return tensors

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        format: str = "peftlab",
        is_main_process: bool = True,
        state_dict: dict[str, Tensor] | None = None,
        **_: Any,
    ) -> None:
        """Write each adapter (``default`` at the top, others in sub-folders named after them, as HF PEFT
        does); :meth:`from_pretrained` loads them all back.

        ``format="peft"`` writes files that ``peft.PeftModel.from_pretrained`` loads (methods HF PEFT has).

        ``state_dict``: the model's full state dict (keys of ``self.state_dict()``), e.g. the one
        ``transformers.Trainer`` gathers under FSDP or DeepSpeed ZeRO-3; the adapters' tensors are taken from it
        instead of from the parameters. Without it, parameters sharded by FSDP2 (``DTensor``) or partitioned by
        ZeRO-3 are gathered first: a collective, so call ``save_pretrained`` on every process, with
        ``is_main_process`` true on one of them. Only the main process writes. A tensor whose shape is not the
        adapter's declared shape (e.g. a ZeRO-3 partition of shape (0,)) is an :class:`AdapterError`, never a file.
        """
        if format not in FORMATS:
            raise ConfigError(f"format={format!r}: use one of {list(FORMATS)}")
        if not is_main_process and state_dict is not None:
            return  # nothing to gather: the main process has the full state dict
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self._check_loaded(names, "save")
        base_name = getattr(getattr(self.base_model, "config", None), "name_or_path", None)
        for name in names:
            tensors = self._tensors_to_save(name, state_dict)
            if not is_main_process:
                continue
            folder = Path(save_directory) if name == "default" else Path(save_directory) / name
            config = self.peft_config[name]
            if format == "peft":
                layers = {n: (layer.view.kind, sharded.declared_shape(layer.base_layer.weight))
                          for n, layer in self._layers() if name in layer.adapters}
                data = peft_format.peft_config(config, sorted(layers), base_name)
                tensors = peft_format.tensors_to_peft(tensors, layers)
            else:
                data = {**config.to_dict(), "base_model_name_or_path": base_name}
            files.save_tensors(folder / files.WEIGHTS_NAME, tensors, metadata={"format": "pt"})
            files.atomic_write_json(folder / files.CONFIG_NAME, data)

    # -- loading ---------------------------------------------------------------------------------------------
    def load_adapter(
        self,
        path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Add the adapter saved in ``path`` (by peftlab or HF PEFT) under ``adapter_name``; the names, shapes
        and values (finite) of its tensors are checked, and a failed load leaves the model as it was.

        Into a name that exists already (as HF PEFT does, e.g. after :meth:`from_pretrained` restored every
        adapter of a folder): the file's weights replace that adapter's, if its config equals the existing one;
        a different config raises :class:`AdapterLoadError` naming the fields that differ.

        ``low_cpu_mem_usage=True``: the adapter is created on the meta device and takes the file's tensors
        themselves (:mod:`peftlab.lowmem`) instead of being initialised and then overwritten; same result.
        """
        data = files.read_json(Path(path) / files.CONFIG_NAME)
        data.pop("base_model_name_or_path", None)
        peft = peft_format.is_peft_config(data)
        if peft:
            config = peft_format.config_from_peft(data, [n for n, _ in self.base_model.named_modules()])
        else:
            config = config_from_dict(data)
        tensors = files.load_tensors(path)
        existing = self.peft_config.get(adapter_name)
        if existing is not None:
            check_same_config(existing, config, adapter_name, path)
        else:
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            if peft:
                shapes = {k: tuple(v.shape) for k, v in self.adapter_parameters(adapter_name).items()}
                tensors = peft_format.tensors_from_peft(tensors, shapes)
            self.set_adapter_state_dict(tensors, adapter_name, source=str(path))
        except Exception:
            if existing is None:
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
        low_cpu_mem_usage: bool = False,
    ) -> Self:
        """Wrap ``model`` with every adapter saved in ``path`` (inference mode unless ``is_trainable``).

        ``path`` is laid out as :meth:`save_pretrained` (and HF PEFT) writes it: the adapter at the top is
        loaded as ``adapter_name``, each sub-folder holding an adapter under the sub-folder's name. The top
        adapter is active (``default`` for a folder from ``save_pretrained``); a folder with adapters in
        sub-folders only activates the first by name. Use :meth:`set_adapter` to switch. Sub-folders that
        hold a ``trainer_state.json`` are training checkpoints, not adapters of this folder, and are
        skipped. If one adapter fails to load, none stays on ``model``. Folders written by HF PEFT load too.

        ``low_cpu_mem_usage=True`` builds each adapter on the meta device and materialises it from the file's
        tensors (see :meth:`load_adapter`), so no adapter is allocated twice; the result is the same.
        """
        folders = adapter_folders(Path(path), adapter_name)
        wrapped = cls(model)
        try:
            for name, folder in folders.items():
                wrapped.load_adapter(folder, name, is_trainable=is_trainable, low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception:
            for name in list(wrapped.peft_config):
                wrapped.delete_adapter(name)
            raise
        wrapped.set_adapter(next(iter(folders)))
        if not is_trainable:
            wrapped.eval()
        return wrapped


def check_same_config(existing: AdapterConfig, config: AdapterConfig, adapter_name: str, path: str | os.PathLike
                      ) -> None:
    """:class:`AdapterLoadError` unless the config saved in ``path`` equals adapter ``adapter_name``'s."""
    if config == existing:
        return
    if type(config) is not type(existing):
        differ = f"it is a {config.method} adapter, the existing one {existing.method}"
    else:
        old, new = existing.to_dict(), config.to_dict()
        differ = ", ".join(f"{k}={new.get(k)!r} (existing: {old.get(k)!r})" for k in sorted(old.keys() | new.keys())
                           if old.get(k) != new.get(k))
    raise AdapterLoadError(
        f"cannot load {path} into the existing adapter {adapter_name!r}: its config differs ({differ}); "
        f"load it under another adapter_name, or delete_adapter({adapter_name!r}) first"
    )


def adapter_folders(path: Path, top_name: str) -> dict[str, Path]:
    """name → folder of the adapters in ``path``: its top (as ``top_name``), then its sub-folders by name."""
    found = {top_name: path} if (path / files.CONFIG_NAME).is_file() else {}
    subfolders = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    for sub in subfolders:
        if "." not in sub.name and (sub / files.CONFIG_NAME).is_file() and not (sub / TRAINER_STATE_NAME).exists():
            found.setdefault(sub.name, sub)
    return found or {top_name: path}  # nothing there: loading the top gives the error that says so
