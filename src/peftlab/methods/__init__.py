"""Adapter methods. Importing this package registers every built-in method (and, on first ask, the plugins).

Each method registers its config class itself with :func:`peftlab.config.register_method`; the config base
never imports a method. This package is where the registry is read: :func:`registered_methods` (built-in,
registered in code, and third-party through the ``peftlab.methods`` entry point group),
:func:`peft_methods`, and :func:`config_from_dict` (the config of the method that a saved dict names).
"""

from __future__ import annotations  # noqa: I001  (the methods register in --help's order)

import warnings
from typing import Any

from peftlab.config import METHODS, AdapterConfig
from peftlab.methods import hra, lora  # noqa: F401  (registration side effects)
from peftlab.methods import hydralora, mtlora  # noqa: F401

ENTRY_POINT_GROUP = "peftlab.methods"
_plugins_loaded = False


def registered_methods() -> dict[str, type[AdapterConfig]]:
    """Every known method: the built-in ones, those registered in code, and third-party ones.

    A package adds a method by registering its config module under the ``peftlab.methods`` entry point
    group (``[project.entry-points."peftlab.methods"] mymethod = "mypkg.mymethod"``); the module is
    imported here once, and its ``@register_method`` does the rest. A plugin that fails to import is
    reported with a warning and skipped.
    """
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        from importlib.metadata import entry_points

        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry.load()
            except Exception as err:  # a broken plugin must not break peftlab
                warnings.warn(f"peftlab: method plugin {entry.name!r} ({entry.value}) failed to load: {err}",
                              stacklevel=2)
    return METHODS


def peft_methods() -> list[str]:
    """Methods that HF PEFT has too (they load from and export to its format)."""
    return sorted(name for name, cls in registered_methods().items() if cls.peft_type)


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """The config of the method named in ``data["method"]``, plugins included (see
    :meth:`peftlab.config.AdapterConfig.from_dict`)."""
    registered_methods()
    return AdapterConfig.from_dict(data)
