"""Module-name matching, written once and bounded in time: every config field that names modules uses it.

Design notes: ``docs/design.md``, section peftlab.matching.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

import regex

from peftlab.errors import ConfigError

try:  # the parser behind re.compile: used to measure how far counted repeats expand
    from re import _constants as _sre_constants
    from re import _parser as _sre_parser
except ImportError:  # Python 3.10
    import sre_constants as _sre_constants
    import sre_parse as _sre_parser

MATCH_TIMEOUT_S = 1.0
MAX_PATTERN_LENGTH = 10_000
MAX_EXPANDED_SIZE = 100_000
DEFAULT_LAYER_PATTERNS = ("layers", "layer", "h", "blocks", "block", "down_blocks", "up_blocks")
PROBE_NAMES = (
    "base_model.model.model.language_model.layers.31.self_attn.q_proj.base_layer",
    "encoder.block.11.layer.0.SelfAttention.relative_attention_bias.weight_0",
)

_REPEATS = tuple(getattr(_sre_constants, op, None) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"))


def _shown(pattern: str) -> str:
    """The pattern's repr, shortened for a one-line message."""
    text = repr(pattern)
    return text if len(text) <= 120 else text[:100] + f"...' ({len(pattern)} characters)"


def _expanded_size(items: Any) -> int:
    """Elements of a parsed pattern once every counted repeat ``{m,n}`` is written out (``*`` and ``+`` count once)."""
    total = 0
    for op, av in items:
        if op in _REPEATS:
            low, high, sub = av
            count = low if high == _sre_constants.MAXREPEAT else high
            total += max(count, 1) * _expanded_size(sub)
            continue
        total += 1
        for part in av if isinstance(av, (tuple, list)) else (av,):
            if isinstance(part, _sre_parser.SubPattern):
                total += _expanded_size(part)
            elif isinstance(part, list):  # BRANCH: (None, [SubPattern, ...])
                total += sum(_expanded_size(p) for p in part if isinstance(p, _sre_parser.SubPattern))
        if total > MAX_EXPANDED_SIZE:
            break
    return total


@functools.lru_cache(maxsize=512)
def _compile(pattern: str) -> regex.Pattern:
    """The checked, compiled pattern; raises ``ValueError(reason)`` (the caller adds field and pattern)."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"is too long (at most {MAX_PATTERN_LENGTH} characters); list module-name suffixes instead")
    try:
        re.compile(pattern)
        if _expanded_size(_sre_parser.parse(pattern)) > MAX_EXPANDED_SIZE:
            raise ValueError(
                f"expands to more than {MAX_EXPANDED_SIZE} elements (its counted repeats {{m,n}} multiply); "
                "simplify it"
            )
        compiled = regex.compile(pattern)
    except re.error as err:
        raise ValueError(f"is not a valid regular expression: {err}") from None
    except (regex.error, OverflowError) as err:
        raise ValueError(f"cannot be compiled: {err}; simplify it") from None
    except RecursionError:
        raise ValueError("nests groups too deeply; simplify it") from None
    for name in PROBE_NAMES:
        _run(compiled, name, "fullmatch", probe=True)
    return compiled


def _run(compiled: regex.Pattern, name: str, how: str, probe: bool = False) -> Any:
    try:
        return getattr(compiled, how)(name, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        what = f"a typical module name ({name!r})" if probe else f"the module name {name!r}"
        raise ValueError(
            f"took more than {MATCH_TIMEOUT_S:g} s to match {what} (it backtracks, e.g. nested repeats like "
            "(a+)+); simplify it, or list module-name suffixes instead"
        ) from None


def _problem(field: str, pattern: str, err: ValueError) -> ConfigError:
    return ConfigError(f"{field}={_shown(pattern)} {err}")


def compile_pattern(pattern: str, field: str = "pattern") -> regex.Pattern:
    """``pattern`` compiled after the checks of docs/design.md; :class:`ConfigError` naming ``field`` if not."""
    try:
        return _compile(pattern)
    except ValueError as err:
        raise _problem(field, pattern, err) from None


def check_pattern(pattern: str, field: str = "pattern") -> None:
    """Raise :class:`ConfigError` unless ``pattern`` is a regex that module names can be matched against."""
    compile_pattern(pattern, field)


def _match(pattern: str, name: str, how: str, field: str) -> Any:
    """``fullmatch`` / ``search`` of the checked ``pattern`` on ``name``; :class:`ConfigError` naming ``field``."""
    compiled = compile_pattern(pattern, field)
    try:
        return _run(compiled, name, how)
    except ValueError as err:
        raise _problem(field, pattern, err) from None


def full_match(pattern: str, name: str, field: str = "pattern") -> bool:
    """Whether the regex ``pattern`` matches all of ``name`` (within :data:`MATCH_TIMEOUT_S`)."""
    return _match(pattern, name, "fullmatch", field) is not None


def is_suffix(name: str, suffix: str) -> bool:
    """``name`` is ``suffix`` or ends with ``"." + suffix``."""
    return name == suffix or name.endswith("." + suffix)


def matches(name: str, spec: list[str] | str | None, field: str = "target_modules") -> bool:
    """Suffix match (list) or full regex match (string) of a module name; ``None`` matches nothing."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return full_match(spec, name, field)
    return any(is_suffix(name, s) for s in spec)


def first_match(name: str, keys: Iterable[str], field: str) -> str | None:
    """The first key that is a suffix of ``name`` or a regex matching all of it (``rank_pattern`` and kin)."""
    for key in keys:
        if is_suffix(name, key) or full_match(key, name, field):
            return key
    return None


def layer_regex(patterns: list[str] | str | None = None) -> str:
    """The regex :func:`layer_index` searches with: a layer-list name, a dot, the index (group 1)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    alternatives = "|".join(re.escape(p) for p in (patterns or DEFAULT_LAYER_PATTERNS))
    return rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)"


def layer_index(name: str, patterns: list[str] | str | None = None) -> int | None:
    """The index in ``...layer.3.attention...``-style names, or ``None``.

    ``patterns`` are literal names of the layer list (``"layer"``, ``"model.layers"``), not regexes.
    """
    found = _match(layer_regex(patterns), name, "search", "layers_pattern")
    return int(found.group(1)) if found else None


def component_targets(components: dict[str, list[str]]) -> str:
    """A ``target_modules`` regex that picks layers by the model component they sit in.

    ``components`` maps a component's module name (``language_model``, ``vision_tower``,
    ``multi_modal_projector`` in a transformers LLaVA) to the layer names to adapt inside it; both are
    literal (dots allowed), and each matches at a ``.`` boundary anywhere in the full module name::

        component_targets({"language_model": ["q_proj", "v_proj"], "multi_modal_projector": ["linear_1"]})
        # (?:.*\\.)?language_model\\.(?:.*\\.)?(?:q_proj|v_proj)|(?:.*\\.)?multi_modal_projector\\. ...

    matches ``model.language_model.layers.3.self_attn.q_proj`` and ``model.multi_modal_projector.linear_1``
    but not ``model.vision_tower.encoder.layers.0.self_attn.q_proj``. The result is a plain string, so it is
    saved with the adapter's config and loads anywhere.
    """
    if not components or not all(isinstance(c, str) and c and leaves for c, leaves in components.items()):
        raise ConfigError(
            "component_targets needs {component: [layer names]} with at least one layer name each; "
            f"got {components!r}"
        )
    parts = []
    for component, leaves in components.items():
        if isinstance(leaves, str) or not all(isinstance(leaf, str) and leaf for leaf in leaves):
            raise ConfigError(f"component_targets: the layers of {component!r} must be a list of names; got {leaves!r}")
        names = "|".join(re.escape(leaf) for leaf in leaves)
        parts.append(rf"(?:.*\.)?{re.escape(component)}\.(?:.*\.)?(?:{names})")
    pattern = "|".join(parts)
    check_pattern(pattern, "target_modules")
    return pattern
