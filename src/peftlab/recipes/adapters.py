"""From a method name on the command line to a model ready to train.

Method names come from the registry (:func:`peftlab.methods.registered_methods`): each config class
brings its name, its ``variants`` (``mtlora-icfm`` → ``structure="icfm"``), its default learning rate
and a one-line description, so a new method is usable here without editing this file. Two names are
not adapters: ``full`` (every weight trains) and ``linear-probe`` (only the classification head trains).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError, PeftlabError, RecipeError
from peftlab.layers import CLASSIFIER_HEADS
from peftlab.methods import registered_methods
from peftlab.model import AdapterModel, get_adapter_model

FULL, LINEAR_PROBE = "full", "linear-probe"
# Target pairs tried in order: the first whose layers all exist in the model is the default.
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, MiniLM, ELECTRA
    ("query_proj", "value_proj"),  # DeBERTa-v2/v3
    ("q_proj", "v_proj"),  # Llama, SmolLM2, Mistral, OPT, Qwen
    ("q_lin", "v_lin"),  # DistilBERT
    ("c_attn",),  # GPT-2 (fused q|k|v)
)
NOT_OPTIONS = frozenset({"r", "target_modules", "modules_to_save"})  # set by the recipe, not by --adapter-arg


@dataclass(frozen=True)
class MethodSpec:
    """How a method name becomes a model to train.

    Args:
        name: the name users type.
        lr: the learning rate used when none is given (the config class's ``default_lr``).
        config_class: the adapter config (``None``: ``full`` / ``linear-probe``).
        fixed: config fields the name implies (``mtlora-icfm`` → ``structure="icfm"``).
        description: one line for ``--help``.
    """

    name: str
    lr: float
    config_class: type[AdapterConfig] | None
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def method_specs() -> dict[str, MethodSpec]:
    """Every method name: each registered method and its variants, then ``full`` and ``linear-probe``."""
    specs: dict[str, MethodSpec] = {}
    for name, cls in registered_methods().items():
        specs[name] = MethodSpec(name, cls.default_lr, cls, description=cls.description)
        for variant, fixed in cls.variants.items():
            what = ", ".join(f"{k}={v}" for k, v in fixed.items())
            specs[variant] = MethodSpec(variant, cls.default_lr, cls, dict(fixed), f"{name} with {what}")
    specs[FULL] = MethodSpec(FULL, 1e-4, None, description="full fine-tuning, every weight trains")
    specs[LINEAR_PROBE] = MethodSpec(LINEAR_PROBE, 5e-3, None,
                                     description="frozen encoder, only the classification head trains")
    return specs


def method_spec(name: str) -> MethodSpec:
    """The spec of a method name, or ``RecipeError`` listing the known names."""
    specs = method_specs()
    if name not in specs:
        raise RecipeError(f"unknown method {name!r}; known methods: {', '.join(specs)}")
    return specs[name]


def layer_names(model: nn.Module) -> set[str]:
    """Leaf names of the model's Linear / Conv1D layers (``query``, ``q_proj``, ``c_attn``, ...)."""
    from transformers.pytorch_utils import Conv1D

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def default_targets(model: nn.Module) -> list[str] | str:
    """The attention query/value projections under the model's own names, else ``"all-linear"``."""
    names = layer_names(model)
    for pair in DEFAULT_TARGETS:
        if names.issuperset(pair):
            return list(pair)
    return "all-linear"


def head_modules(model: nn.Module) -> list[str]:
    """Top-level classification-head modules (``classifier``, ``score``, DistilBERT's ``pre_classifier``)."""
    return [name for name, _ in model.named_children() if name in CLASSIFIER_HEADS]


def adapter_options(method: str, options: dict[str, Any] | None) -> tuple[type[AdapterConfig], dict[str, Any]]:
    """The config class of ``method`` and its fields: the method's fixed fields plus ``options``, checked.

    Raises ``RecipeError`` when an option contradicts a fixed field (``mtlora-icfm`` with ``structure=shim``)
    or names no field of the config class. ``r``, ``target_modules`` and ``modules_to_save`` are not options.
    """
    spec = method_spec(method)
    options = options or {}
    if spec.config_class is None:
        if options:
            raise RecipeError(f"method {method} has no adapter config to set {sorted(options)} on")
        raise RecipeError(f"method {method} trains no adapter")
    cls = spec.config_class
    fields = {f.name for f in dataclasses.fields(cls)} - NOT_OPTIONS
    clash = {k: v for k, v in spec.fixed.items() if k in options and options[k] != v}
    if clash:
        key = next(iter(clash))
        raise RecipeError(f"method {method} means {key}={clash[key]!r}, but {key}={options[key]!r} was given; "
                          f"use --method {cls.method} with {key}={options[key]!r}, or drop the option")
    options = {**spec.fixed, **options}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields))
        raise RecipeError(f"{cls.__name__} has no field(s) {unknown}; --adapter-arg accepts: {valid}")
    return cls, options


def build_adapter_config(
    method: str,
    model: nn.Module | None,
    r: int,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> AdapterConfig | None:
    """The adapter config for ``method`` (``None`` for ``full`` / ``linear-probe``), checked.

    Targets default to the query/value projections of ``model`` (``default_targets``; ``model=None``
    only checks the fields); ``options`` are further fields of the method's config class, checked by name.
    """
    if method_spec(method).config_class is None:
        if options:
            raise RecipeError(f"method {method} has no adapter config to set {sorted(options)} on")
        return None
    cls, options = adapter_options(method, options)
    targets = target_modules or (default_targets(model) if model is not None else "all-linear")
    try:
        return cls(r=r, target_modules=targets, modules_to_save=modules_to_save or None, **options)
    except (ConfigError, TypeError) as err:
        raise RecipeError(f"{method}: {err}") from None


def prepare_model(
    model: nn.Module, options: Any, classification: bool, texts: Callable[[], Sequence[str]] | None = None
) -> nn.Module:
    """Put ``options.method`` on ``model``: wrap it with an adapter, unfreeze all (``full``) or only the head.

    For classification the new head (``classifier`` / ``score``) is trained with the adapter
    (``modules_to_save``) and saved with it. ``texts()`` (the training inputs, computed only when needed)
    serves config fields resolved from data, such as HydraLoRA's ``num_heads="auto"``.
    """
    heads = head_modules(model) if classification else []
    if classification and not heads and options.method != FULL:
        raise RecipeError(f"{type(model).__name__} has no classification head named one of {CLASSIFIER_HEADS}")
    if options.method == FULL:
        model.requires_grad_(True)
        return model
    if options.method == LINEAR_PROBE:
        model.requires_grad_(False)
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
        return model
    config = build_adapter_config(options.method, model, options.r, options.target_modules, heads,
                                  options.adapter_args)
    try:
        config = config.resolve(texts, seed=options.seed)
        return get_adapter_model(model, config)
    except PeftlabError as err:  # targets matching nothing, r too large for a layer, ...
        raise RecipeError(str(err)) from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (adapters and head copies included)."""
    if isinstance(model, AdapterModel):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
