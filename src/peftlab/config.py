"""Adapter configurations: one dataclass per method, sharing the targeting fields.

A config is plain data. It validates itself when built (so a bad value fails before any model is
touched), round-trips through JSON (``to_dict`` / ``from_dict``), and records which method it is for.
Methods register their config class with :func:`register_method`; the plumbing never imports a method
by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftlab import matching
from peftlab._version import __version__
from peftlab.errors import ConfigError, UnsupportedError

BIAS_MODES = ("none", "all")


@dataclass
class AdapterConfig:
    """Fields shared by every method.

    Args:
        r: rank of the adapter (number of reflections for HRA).
        target_modules: which layers to adapt. A list of name suffixes (``["query", "value"]`` matches
            ``...attention.self.query``), a regex string matched against the full module name, or
            ``"all-linear"`` (every Linear / Conv1D except the model's output head).
        exclude_modules: same forms as ``target_modules``; matching modules are skipped.
        layers_to_transform: only adapt layers with these indices (``layer.3.`` / ``layers.3.`` / ``h.3.``).
        layers_pattern: the name of the layer list when ``layers_to_transform`` is used
            (e.g. ``"layer"``); by default common names are tried.
        rank_pattern: per-module rank, ``{suffix_or_regex: r}``; the first matching key wins.
        modules_to_save: extra modules (e.g. a new classifier head) trained in full and saved with
            the adapter.
        bias: ``"none"``, ``"all"`` (every bias in the model is trained) or ``"<method>_only"``
            (biases of the adapted layers only).
    """

    # What the rest of peftlab needs to know about the method (the CLI, the recipes, PEFT interop):
    method: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line for --help
    default_lr: ClassVar[float] = 1e-3  # learning rate used when the user gives none
    cli_fields: ClassVar[tuple[str, ...]] = ()  # fields with a flag of their own (--num-heads); help from metadata
    variants: ClassVar[dict[str, dict[str, Any]]] = {}  # more names: {"mtlora-shim": {"structure": "shim"}}
    peft_type: ClassVar[str | None] = None  # HF PEFT's name of the method, if PEFT has it (see from_peft / to_peft)

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (tuple, set)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    # -- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field.

        An ``adapter_config.json`` is untrusted input: every field's type is checked here, and every regex
        is checked by :mod:`peftlab.matching` (syntax, size, and a probe run bounded in time).
        """
        check_positive_int("r", self.r)
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern must be a dict {{module suffix or regex: r}}; got {self.rank_pattern!r}")
        for key, value in self.rank_pattern.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"rank_pattern keys must be non-empty module-name suffixes or regexes; got {key!r}")
            check_positive_int(f"rank_pattern[{key!r}]", value)
            matching.check_pattern(key, "rank_pattern")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                if value != "all-linear":
                    matching.check_pattern(value, name)
            elif not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                raise ConfigError(
                    f"{name} must be a list of module-name suffixes, a regex string or 'all-linear'; got {value!r}"
                )
        if self.layers_to_transform is not None and not (
            isinstance(self.layers_to_transform, list)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform)
        ):
            raise ConfigError(
                f"layers_to_transform must be non-negative layer indices; got {self.layers_to_transform!r}"
            )
        pattern = self.layers_pattern
        if pattern is not None:
            if not (isinstance(pattern, str) and pattern) and not (
                isinstance(pattern, list) and all(isinstance(p, str) and p for p in pattern)
            ):
                raise ConfigError(
                    f"layers_pattern must be the name of the layer list (e.g. 'layers') or a list of such names; "
                    f"got {pattern!r}"
                )
            matching.check_pattern(matching.layer_regex(pattern), "layers_pattern")
        allowed = (*BIAS_MODES, f"{self.method}_only")
        if self.bias not in allowed:
            raise ConfigError(f"bias={self.bias!r} is not supported; use one of {list(allowed)}")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            hint = f"; did you mean [{self.modules_to_save!r}]?" if isinstance(self.modules_to_save, str) else ""
            raise ConfigError(f"modules_to_save must be a list of module names; got {self.modules_to_save!r}{hint}")

    def rank_for(self, module_name: str) -> int:
        """The rank for one module: the first ``rank_pattern`` key that matches, else ``r``."""
        key = matching.first_match(module_name, self.rank_pattern, "rank_pattern")
        return self.r if key is None else self.rank_pattern[key]

    # -- data-dependent fields -----------------------------------------------------------------------------
    def unresolved_fields(self) -> list[str]:
        """Fields whose value must be computed from the training data before a model is built (e.g.
        HydraLoRA's ``num_heads="auto"``); :meth:`resolve` fills them."""
        return []

    def resolve(self, texts: Callable[[], Sequence[str]] | None, seed: int = 0) -> AdapterConfig:
        """A copy with every :meth:`unresolved_fields` entry computed from ``texts()`` (the training inputs)."""
        return self

    # -- HF PEFT ---------------------------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, data: dict[str, Any], common: dict[str, Any]) -> AdapterConfig:
        """The config equivalent to a PEFT ``adapter_config.json`` of type ``peft_type``.

        ``common`` holds the targeting fields already translated (r, target_modules, ...)."""
        raise UnsupportedError(f"HF PEFT has no {cls.method} method")

    def to_peft(self, targets: list[str]) -> dict[str, Any]:
        """This method's own fields in PEFT's ``adapter_config.json`` names (targeting fields excluded), for
        an adapter on exactly the modules ``targets``; ``UnsupportedError`` if PEFT cannot express it."""
        peft = sorted(name for name, cls in METHODS.items() if cls.peft_type)
        raise UnsupportedError(f"HF PEFT has no {self.method} method; only {peft} export to it")

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that records the method and the peftlab version."""
        data = {"method": self.method, "peftlab_version": __version__}
        data.update(dataclasses.asdict(self))
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        """Build the config of the method named in ``data["method"]``, among the registered ones
        (:func:`peftlab.methods.config_from_dict` loads the plugins first)."""
        data = dict(data)
        method = data.pop("method", None)
        data.pop("peftlab_version", None)
        methods = METHODS
        if not isinstance(method, str) or method not in methods:
            raise ConfigError(
                f"adapter config names method {method!r}, which this peftlab does not know; "
                f"known methods: {sorted(methods)}"
            )
        cls = methods[method]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no field(s) {unknown}; valid fields: {sorted(names)}. "
                "Was the adapter saved by a newer peftlab?"
            )
        return cls(**data)


METHODS: dict[str, type[AdapterConfig]] = {}  # method name → config class; read through peftlab.methods


def register_method(config_cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a config (and so its method) known by name to loading, the CLI and recipes."""
    if not config_cls.method:
        raise TypeError(f"{config_cls.__name__} must set the class attribute `method`")
    METHODS[config_cls.method] = config_cls
    return config_cls


# -- checks for numeric config fields (every method validates its numbers with these) -------------------------
def _is_number(value: Any, integer: bool = False) -> bool:
    """An int (or, unless ``integer``, a finite float); ``bool`` is never a number here."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (not integer and isinstance(value, float) and math.isfinite(value))


def check_positive_int(name: str, value: Any, hint: str = "") -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int ≥ 1."""
    if not _is_number(value, integer=True) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer{' ' + hint if hint else ''}; got {value!r}")


def check_finite(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number."""
    if not _is_number(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number > 0."""
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0; got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number ≥ 0."""
    if not _is_number(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0; got {value!r}")


def check_probability(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``0 <= value < 1``."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1); got {value!r}")
