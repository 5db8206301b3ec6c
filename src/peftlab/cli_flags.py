"""Command-line flags generated from dataclass fields (as ``HfArgumentParser`` does) and the method flags.

``add_field_flags`` gives one ``--field-name`` per field, typed from its annotation, with the help and group in
the field's metadata; ``add_method_flags`` gives ``--method`` and each registered method's own config fields
(``cli_fields``). :mod:`peftlab.cli` builds its subcommands from them.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), _yaml_value(value)


def _default_text(f: dataclasses.Field) -> str:
    """``(default 8)``, or the per-task defaults of a field whose default is ``None``."""
    from peftlab.recipes.options import TASK_DEFAULTS

    if f.default is None or f.default is dataclasses.MISSING:
        by_task = {task: d[f.name] for task, d in TASK_DEFAULTS.items() if f.name in d}
        if not by_task:
            return ""
        if len(set(map(str, by_task.values()))) == 1:
            return f" (default {next(iter(by_task.values()))})"
        return " (default " + ", ".join(f"{t}: {v}" for t, v in by_task.items()) + ")"
    if isinstance(f.default, bool):
        return ""
    return f" (default {f.default})"


def add_field_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    help: dict[str, str] | None = None,
) -> None:
    """One flag per dataclass field (``--field-name``), typed from the annotation, help and group from the
    field's metadata (as ``HfArgumentParser`` does). Every default is ``None``: "not given"."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in include or list(fields):
        f = fields[name]
        meta = f.metadata
        if name in exclude or meta.get("cli") is False:
            continue
        group_name = meta.get("group", "options")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        text = (help or {}).get(name) or meta.get("help", "") + _default_text(f)
        kind = str(f.type)
        if kind == "bool":
            negated = flag.startswith("--no-")
            group.add_argument(flag, dest=name, action="store_false" if negated else "store_true", default=None,
                               help=text)
            continue
        if kind.startswith("dict"):
            group.add_argument(flag, dest=name, action="append", type=_key_value, metavar="KEY=VALUE", help=text)
            continue
        choices = meta.get("choices")
        convert = positive_int if name in _positive_fields() else {"int": int, "float": float}.get(
            kind.split(" | ")[0], str)
        group.add_argument(flag, dest=name, type=convert, choices=choices() if callable(choices) else choices,
                           help=text)


def _positive_fields() -> tuple[str, ...]:
    from peftlab.recipes.options import POSITIVE_INTS

    return POSITIVE_INTS


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """``--method`` (every registered method and variant) and the flags each method's config exposes
    (``cli_fields``, e.g. ``--num-heads``, ``--structure``); their values go to the method's config."""
    from peftlab.methods import registered_methods
    from peftlab.recipes.adapters import method_specs

    group = parser.add_argument_group("method")
    specs = method_specs()
    group.add_argument("--method", choices=list(specs), help="adapter method (default hra): " + "; ".join(
        f"{n}: {s.description} (lr {s.lr:g})" for n, s in specs.items()))
    seen: dict[str, list[str]] = {}
    for method, cls in registered_methods().items():
        for name in cls.cli_fields:
            seen.setdefault(name, []).append(method)
    for name, methods in seen.items():
        f = next(f for f in dataclasses.fields(registered_methods()[methods[0]]) if f.name == name)
        choices = f.metadata.get("choices")
        group.add_argument("--" + name.replace("_", "-"), dest=f"method_field_{name}", type=_yaml_value,
                           metavar=name.upper() if not choices else "{" + ",".join(choices) + "}",
                           help=f"{f.metadata.get('help', name)} ({', '.join(methods)}; default {f.default})")


def report_flags(p: argparse.ArgumentParser) -> None:
    """``peftlab report``'s flags (:mod:`peftlab.commands.report`)."""
    p.description = ("Write DIR/report.html: options, metrics tables, training curve, image grids and other figures, "
                     "a comparison's tables, plot and trials with a linked section per run, an analysis' numbers and "
                     "plot. Images are embedded (PNG data URIs); no other file, network or JavaScript is needed to "
                     "view or share the page.")
    p.add_argument("folders", nargs="+", metavar="DIR", help="run, compare or analyze output folders")
    p.add_argument("--out", metavar="FILE.html", help="with one DIR: write the page here (default DIR/report.html)")
    p.add_argument("--spectrum", action="store_true", help="also the spectral change of every adapted layer (loads "
                   "each run's adapter on its base model)")
