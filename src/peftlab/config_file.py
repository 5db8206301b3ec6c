"""The ``--config FILE.yaml`` of every ``peftlab`` subcommand: option values read from a YAML mapping."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from peftlab.errors import UsageError as CLIError


def read_config(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """The option values of a ``--config`` YAML file (keys: long option names) for the parsed ``args``; a bad
    file or an unknown key is a one-line usage error naming the valid options."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise CLIError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CLIError(f"--config {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"--config {path} must hold a mapping of option names to values, not {type(data).__name__}")
    valid = set(vars(args)) - {"func", "command", "config"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in ("adapter_args", "adapter_arg") and isinstance(value, dict) and "adapter_args" in valid:
            name, value = "adapter_args", [(str(k), v) for k, v in value.items()]
        elif f"method_field_{name}" in valid:  # a method's own flag (num_heads: auto)
            name = f"method_field_{name}"
        elif name == "no_initial_eval" and "initial_eval" in valid:
            name, value = "initial_eval", not value
        if name not in valid:
            shown = sorted(v.removeprefix("method_field_") for v in valid)
            raise CLIError(f"--config {path}: unknown option {key!r}; valid: {', '.join(shown)}")
        out[name] = value
    return out
