"""peftlab adapters on a diffusers pipeline: its UNet and text encoder, saved together in one folder.

The adapters go *into* the pipeline's own components: ``add_pipeline_adapters`` wraps ``pipe.unet`` (and
``pipe.text_encoder``) with :func:`peftlab.get_adapter_model`, which swaps the targeted layers in place, so the
pipeline keeps calling its ``UNet2DConditionModel`` as before (``unet(sample, t, encoder_hidden_states=...,
return_dict=False)``) and every layer computes W·H / W + ΔW. The ``AdapterModel`` of each component is kept in
``pipe.peftlab_adapters`` (:func:`pipeline_adapters`), which saving, merging and export read.

A pipeline's adapter folder::

    folder/pipeline.json        {"base_model": name or path, "pipeline_class": ..., "components": [...], ...}
    folder/unet/                an ordinary peftlab adapter folder (adapter_config.json + safetensors)
    folder/text_encoder/        the same, when the text encoder was adapted
    folder/controlnet/          a diffusers ControlNetModel, when the run trained a control encoder
    folder/condition_encoder/   or peftlab's small ConditionEncoder, hooked onto the UNet's conv_in
                                (:mod:`peftlab.diffusion.conditioning`; ``peftlab train --task controllable``)

Default targets are those of HF PEFT's HRA DreamBooth example: UNet ``proj_in, proj_out, to_k, to_q, to_v,
to_out.0, ff.net.0.proj, ff.net.2`` (``proj_in`` / ``proj_out`` are 1×1 ``Conv2d`` when the UNet has
``use_linear_projection=False``, as Stable Diffusion 1.5 has; methods without Conv2d support, HydraLoRA, get
them dropped by :func:`default_targets`), text encoder ``k_proj, q_proj, v_proj, out_proj, fc1, fc2``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from peftlab import files, peft_format
from peftlab._version import __version__
from peftlab.config import AdapterConfig
from peftlab.errors import AdapterLoadError, ModelError, TargetError, UnsupportedError
from peftlab.layers import layer_kind
from peftlab.lora_export import DIFFUSERS_COMPONENTS, DIFFUSERS_LORA_FILE
from peftlab.methods.base import ADAPTERS
from peftlab.model import AdapterModel

UNET_TARGETS = ["proj_in", "proj_out", "to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_TARGETS = ["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"]
DEFAULT_TARGETS = {"unet": UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS}
PIPELINE_FILE = "pipeline.json"
MODEL_INDEX = "model_index.json"  # what makes a folder a diffusers pipeline
CONTROL_COMPONENT = "controlnet"
CONDITION_COMPONENT = "condition_encoder"  # peftlab.diffusion.conditioning.CONDITION_COMPONENT
EMBEDDED_MODEL = "tiny-digits"  # peftlab.diffusion.embedded.EMBEDDED_MODEL, resolved lazily
ATTRIBUTE = "peftlab_adapters"
ATTRIBUTE_CONDITION = "peftlab_condition"  # peftlab.diffusion.conditioning.ATTRIBUTE


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence diffusers' and transformers' load reports and loading bars inside the block."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from peftlab.base_models import quiet_logging

    with quiet_logging(diffusers_logging, transformers_logging):
        yield


# -- the base pipeline -------------------------------------------------------------------------------------------
def resolve_pipeline(name_or_path: str | os.PathLike) -> str:
    """What ``DiffusionPipeline.from_pretrained`` reads: ``tiny-digits`` (peftlab's embedded model), a local
    folder, or a hub name ``org/name`` (needs the network).

    A folder must hold ``model_index.json`` (what ``DiffusionPipeline.save_pretrained`` writes); anything else is
    a :class:`ModelError` that says so.
    """
    name = str(name_or_path)
    if name == EMBEDDED_MODEL:
        if importlib.util.find_spec("peftlab.diffusion.embedded") is None:
            raise ModelError(f"the embedded model {EMBEDDED_MODEL!r} is not installed in this peftlab "
                             "(peftlab.diffusion.embedded is missing); pass a diffusers pipeline folder")
        from peftlab.diffusion.embedded import ensure_pretrained

        return str(ensure_pretrained())
    path = Path(name).expanduser()
    if not path.exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # a hub name, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5
    if not path.is_dir():
        raise ModelError(f"{name} is not a folder; pass a diffusers pipeline folder (with {MODEL_INDEX}, as "
                         f"DiffusionPipeline.save_pretrained writes it), a hub name org/name, or {EMBEDDED_MODEL!r}")
    if not (path / MODEL_INDEX).is_file():
        raise ModelError(f"{name} is not a diffusers pipeline folder: it has no {MODEL_INDEX} (save one with "
                         "DiffusionPipeline.save_pretrained)")
    return str(path)


def load_pipeline(name_or_path: str | os.PathLike, dtype: Any = None) -> Any:
    """A ``DiffusionPipeline`` (see :func:`resolve_pipeline`), weights from safetensors files only, without the
    loading bars or a safety checker.

    The name it was loaded from is kept (``pipe.peftlab_base``), so saved adapters can name their base.
    """
    import torch
    from diffusers import DiffusionPipeline

    path = resolve_pipeline(name_or_path)
    try:
        with quiet():
            pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True,
                                                     safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        if isinstance(err, KeyError):
            first = f"its {MODEL_INDEX} has no {first} entry"
        raise ModelError(f"could not load the diffusers pipeline {path}: {first}") from None
    pipe.peftlab_base = str(name_or_path)
    encoder_dir = Path(path) / CONDITION_COMPONENT
    if (encoder_dir / "config.json").is_file():  # a merged controllable run: its encoder rides along
        from peftlab.diffusion.conditioning import attach_condition_encoder, load_condition_encoder

        attach_condition_encoder(pipe, load_condition_encoder(encoder_dir))
    return pipe


def component(pipe: Any, name: str) -> nn.Module:
    """The pipeline's component ``name`` (e.g. ``unet``), or AdapterLoadError listing the ones it has."""
    module = pipe.components.get(name)
    if not isinstance(module, nn.Module):
        modules = [k for k, v in pipe.components.items() if isinstance(v, nn.Module)]
        raise AdapterLoadError(f"{type(pipe).__name__} has no component {name!r}; it has {modules}")
    return module


# -- adapters on the components -----------------------------------------------------------------------------------
def default_targets(name: str, model: nn.Module, method: str) -> list[str]:
    """The default ``target_modules`` of component ``name`` for ``method``.

    Targets whose layers in ``model`` are of a kind the method cannot adapt (HydraLoRA routes per token, so it
    takes no ``Conv2d``) are left out, so every method gets a working default on every UNet.
    """
    if name not in DEFAULT_TARGETS:
        raise TargetError(f"no default targets for component {name!r}; give target_modules "
                          f"(defaults exist for {list(DEFAULT_TARGETS)})")
    kinds = ADAPTERS[method].supported_kinds
    found: dict[str, set[str]] = {}
    for module_name, module in model.named_modules():
        for suffix in DEFAULT_TARGETS[name]:
            if module_name == suffix or module_name.endswith("." + suffix):
                found.setdefault(suffix, set()).add(layer_kind(module) or "other")
    return [s for s in DEFAULT_TARGETS[name] if s not in found or found[s] <= set(kinds)]


def pipeline_adapters(pipe: Any) -> dict[str, AdapterModel]:
    """component name → its ``AdapterModel`` (empty when the pipeline has no adapters)."""
    return pipe.__dict__.setdefault(ATTRIBUTE, {})


def add_pipeline_adapters(pipe: Any, configs: Mapping[str, AdapterConfig],
                          adapter_name: str = "default") -> dict[str, AdapterModel]:
    """Put an adapter on each named component (``{"unet": HRAConfig(...), "text_encoder": ...}``) and activate it.

    A config without ``target_modules`` gets the component's defaults (:func:`default_targets`). The components
    are changed in place; their ``AdapterModel`` s are returned (and kept, see :func:`pipeline_adapters`). If one
    component fails, the adapters added to the others are removed again.
    """
    from dataclasses import replace

    registry = pipeline_adapters(pipe)
    done: list[str] = []
    try:
        for name, config in configs.items():
            model = component(pipe, name)
            if config.target_modules is None:
                config = replace(config, target_modules=default_targets(name, model, config.method))
            if name in registry:
                registry[name].add_adapter(adapter_name, config)
                registry[name].set_adapter(adapter_name)
            else:
                registry[name] = AdapterModel(model, config, adapter_name)
            done.append(name)
    except Exception:
        for name in done:
            _drop(pipe, name, adapter_name)
        raise
    return {name: registry[name] for name in configs}


def _drop(pipe: Any, name: str, adapter_name: str) -> None:
    """Remove one adapter from a component (and the component from the registry when none is left)."""
    registry = pipeline_adapters(pipe)
    model = registry[name]
    model.delete_adapter(adapter_name)
    if not model.peft_config:
        del registry[name]


# -- the folder ----------------------------------------------------------------------------------------------------
def is_pipeline_adapter_dir(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a pipeline's adapters (a ``pipeline.json``)."""
    return (Path(folder) / PIPELINE_FILE).is_file()


def save_pipeline_adapters(pipe: Any, folder: str | os.PathLike, format: str = "peftlab") -> Path:
    """Write the pipeline's adapters: one adapter folder per component and ``pipeline.json`` (last, atomically).

    ``format="peft"`` writes each component in HF PEFT's format (``peft.PeftModel.from_pretrained(pipe.unet,
    folder / "unet")``); both formats load back with :func:`load_pipeline_adapters`. A ``controlnet`` component
    (a trained control encoder) is saved whole in ``controlnet/``.
    """
    registry = pipeline_adapters(pipe)
    if not registry:
        raise AdapterLoadError("the pipeline has no peftlab adapters to save; add them with add_pipeline_adapters")
    folder = Path(folder)
    for name, model in registry.items():
        model.save_pretrained(folder / name, format=format)
    info: dict[str, Any] = {"base_model": getattr(pipe, "peftlab_base", None) or pipe.name_or_path,
                            "pipeline_class": type(pipe).__name__, "components": sorted(registry),
                            "format": format, "peftlab_version": __version__}
    if CONTROL_COMPONENT in pipe.components:
        controlnet = pipe.components[CONTROL_COMPONENT]
        with quiet():
            files.atomic_write_folder(folder / CONTROL_COMPONENT, controlnet.save_pretrained)
        info["control"] = CONTROL_COMPONENT
    if ATTRIBUTE_CONDITION in pipe.__dict__:
        from peftlab.diffusion.conditioning import save_condition_encoder

        save_condition_encoder(pipe.__dict__[ATTRIBUTE_CONDITION].encoder, folder / CONDITION_COMPONENT)
        info["control"] = CONDITION_COMPONENT
    files.atomic_write_json(folder / PIPELINE_FILE, info)
    return folder


def read_pipeline_file(folder: str | os.PathLike) -> dict[str, Any]:
    """``pipeline.json`` of an adapter folder, checked: a base model name and a list of component names."""
    folder = Path(folder)
    if not is_pipeline_adapter_dir(folder):
        raise AdapterLoadError(f"{folder} holds no pipeline adapters (no {PIPELINE_FILE}); save them with "
                               "save_pipeline_adapters or peftlab train")
    info = files.read_json(folder / PIPELINE_FILE)
    components = info.get("components")
    if not isinstance(info.get("base_model"), (str, type(None))) or not isinstance(components, list) or not all(
            isinstance(c, str) and c and "/" not in c and not c.startswith(".") for c in components):
        raise AdapterLoadError(f"{folder / PIPELINE_FILE} is not a pipeline adapter file: it needs \"base_model\" "
                               "(a string) and \"components\" (a list of component folder names)")
    if info.get("control") not in (None, CONTROL_COMPONENT, CONDITION_COMPONENT):
        raise AdapterLoadError(f"{folder / PIPELINE_FILE}: \"control\" must be {CONTROL_COMPONENT!r} or "
                               f"{CONDITION_COMPONENT!r} (the folder of the control encoder) or absent; got "
                               f"{info.get('control')!r}")
    return info


def load_pipeline_adapters(folder: str | os.PathLike, base: Any = None, is_trainable: bool = False) -> Any:
    """The base pipeline with the adapters saved in ``folder`` on (and its control encoder, if it has one).

    ``base``: a pipeline folder, ``tiny-digits``, or a loaded pipeline (adapters are added to it); default the
    ``base_model`` named in ``pipeline.json``. An adapter that does not fit its component raises
    :class:`AdapterLoadError`, and nothing stays on a given pipeline.
    """
    folder = Path(folder)
    info = read_pipeline_file(folder)
    if base is None and not info.get("base_model"):
        raise AdapterLoadError(f"{folder / PIPELINE_FILE} names no base_model; pass the base pipeline")
    pipe = load_pipeline(info["base_model"] if base is None else base) if base is None or isinstance(
        base, (str, os.PathLike)) else base
    registry = pipeline_adapters(pipe)
    done: list[str] = []
    try:
        for name in info["components"]:
            model = component(pipe, name)
            try:
                if name in registry:
                    registry[name].load_adapter(folder / name, "default", is_trainable=is_trainable)
                    registry[name].set_adapter("default")
                else:
                    registry[name] = AdapterModel.from_pretrained(model, folder / name, is_trainable=is_trainable)
            except TargetError as err:
                raise AdapterLoadError(f"{folder / name} does not fit the base pipeline's {name}: {err}") from None
            done.append(name)
    except Exception:
        for name in done:
            _drop(pipe, name, "default")
        raise
    if info.get("control") == CONDITION_COMPONENT:
        from peftlab.diffusion.conditioning import attach_condition_encoder, load_condition_encoder

        attach_condition_encoder(pipe, load_condition_encoder(folder / CONDITION_COMPONENT))
    elif info.get("control"):
        pipe = load_control_encoder(pipe, folder / str(info["control"]))
    return pipe


def load_control_encoder(pipe: Any, folder: Path) -> Any:
    """``pipe`` with the ControlNetModel saved in ``folder`` (see :func:`with_control_encoder`)."""
    from diffusers import ControlNetModel

    if not (folder / "config.json").is_file():
        raise AdapterLoadError(f"{folder} holds no control encoder (no config.json); the run folder is incomplete")
    with quiet():
        controlnet = ControlNetModel.from_pretrained(str(folder), dtype=pipe.unet.dtype, use_safetensors=True)
    return with_control_encoder(pipe, controlnet)


def with_control_encoder(pipe: Any, controlnet: nn.Module) -> Any:
    """A ControlNet pipeline sharing ``pipe``'s components and adapters, with ``controlnet`` as its control
    encoder (``save_pipeline_adapters`` then saves it in ``controlnet/``)."""
    from diffusers import StableDiffusionControlNetPipeline

    with quiet():
        control_pipe = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    control_pipe.__dict__[ATTRIBUTE] = pipeline_adapters(pipe)
    control_pipe.peftlab_base = getattr(pipe, "peftlab_base", None)
    return control_pipe


# -- merge and export ----------------------------------------------------------------------------------------------
def merge_pipeline(pipe: Any, safe_merge: bool = True, **options: Any) -> Any:
    """Fold every component's active adapters into its weights and remove the wrappers: a plain pipeline.

    ``options`` go to the methods that take them (HydraLoRA's ``head_weights``).
    """
    registry = pipeline_adapters(pipe)
    merged: list[AdapterModel] = []
    try:
        for model in registry.values():
            model.merge(safe_merge=safe_merge, **options)
            merged.append(model)
    except Exception:
        for model in merged:
            model.unmerge()
        raise
    for model in registry.values():
        model.merge_and_unload()  # merged already: this only removes the wrappers
    registry.clear()
    return pipe


def merge_folder(folder: str | os.PathLike, out: str | os.PathLike, base: str | None = None) -> Any:
    """``peftlab merge`` on a pipeline adapter folder: a plain diffusers pipeline folder in ``out``, which
    ``DiffusionPipeline.from_pretrained(out)`` loads without peftlab. Returns the merged pipeline."""
    pipe = merge_pipeline(load_pipeline_adapters(folder, base))
    pipe.__dict__.pop(ATTRIBUTE, None)

    def write(tmp: Path) -> None:
        with quiet():
            pipe.save_pretrained(tmp)
        if ATTRIBUTE_CONDITION in pipe.__dict__:  # load_pipeline(out) hooks it on again
            from peftlab.diffusion.conditioning import save_condition_encoder

            save_condition_encoder(pipe.__dict__[ATTRIBUTE_CONDITION].encoder, tmp / CONDITION_COMPONENT)

    files.atomic_write_folder(Path(out), write)
    return pipe


def export_folder(folder: str | os.PathLike, out: str | os.PathLike, format: str = "peft",
                  base: str | None = None) -> Path:
    """``peftlab export`` on a pipeline adapter folder: each component in ``format`` (``peft``) under ``out``."""
    return save_pipeline_adapters(load_pipeline_adapters(folder, base), out, format=format)


__all__ = [
    "DEFAULT_TARGETS", "TEXT_ENCODER_TARGETS", "UNET_TARGETS", "add_pipeline_adapters",
    "default_targets", "export_folder", "is_pipeline_adapter_dir", "load_pipeline", "load_pipeline_adapters",
    "merge_folder", "merge_pipeline", "pipeline_adapters", "save_pipeline_adapters", "with_control_encoder",
]


def to_lora_pipeline(pipe: Any, out: str | os.PathLike, **options: Any) -> Path:
    """A diffusers pipeline's adapters as LoRA: ``out/<component>/`` (PEFT folders) and ``out/`` +
    ``pytorch_lora_weights.safetensors``, one file of ``unet.`` / ``text_encoder.`` prefixed PEFT keys at scale 1,
    which ``pipe.load_lora_weights(out)`` loads."""
    if CONTROL_COMPONENT in pipe.components or ATTRIBUTE_CONDITION in pipe.__dict__:
        raise UnsupportedError("this run also trained a control encoder, which a LoRA file cannot hold; "
                               "export it with --format peft instead")
    registry = pipeline_adapters(pipe)
    other = sorted(set(registry) - set(DIFFUSERS_COMPONENTS))
    if other:
        raise UnsupportedError(f"diffusers' LoRA files hold {list(DIFFUSERS_COMPONENTS)} only, not {other}")
    exports = {name: model.to_lora(**options) for name, model in registry.items()}
    combined: dict[str, Tensor] = {}
    for name, export in exports.items():
        extra = sorted(k for k in export.tensors if ".lora_" not in k)
        if extra:
            raise UnsupportedError(
                f"the {name} adapter trains {extra[0].removeprefix(peft_format.PREFIX)} (bias or modules_to_save), "
                "which diffusers' LoRA files cannot hold (every key must be a LoRA factor); train with bias='none' "
                "and no modules_to_save, or use --format peft")
        combined.update({f"{name}.{k.removeprefix(peft_format.PREFIX)}": v for k, v in export.tensors.items()})
    out = Path(out)
    for name, export in exports.items():
        export.save(out / name)
    files.save_tensors(out / DIFFUSERS_LORA_FILE, combined, metadata={"format": "pt"})
    return out
