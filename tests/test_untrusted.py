"""Untrusted input: an adapter folder (its JSON, its tensors, its links) and the patterns in a config.

Every case must end quickly with one peftlab error whose one-line message says what was wrong. The time
asserts are only hang guards (generous bounds); the ``hang_guard`` fixture kills the test process with a
traceback should a case ever spin (a backtracking regex cannot be interrupted from Python).
"""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import re
import stat
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2
from safetensors.torch import save as safetensors_bytes

from peftlab import (
    AdapterLayer,
    AdapterLoadError,
    AdapterModel,
    ConfigError,
    HRAConfig,
    LoraConfig,
    MTLoraConfig,
    PeftlabError,
    TargetError,
    files,
    get_adapter_model,
    matching,
)
from peftlab.config import AdapterConfig
from peftlab.data import cache

HANG_BOUND_S = 10.0  # a hang guard only: bounded cases finish in about MATCH_TIMEOUT_S or far less

# Python's backtracking `re` needs hours for these on a BERT module name ("bert.encoder.layer.0.attention...").
NESTED = r"(\w+\.?)+X"  # the `regex` engine sees at once that no match is possible
LAZY_NESTED = r"(?:\w+?\.??)+?(?=X)"  # exponential in the `regex` engine too: stopped by its time limit


@pytest.fixture(scope="module")
def terminal_fd(request):
    """A copy of the real stderr: output captured by pytest is lost when the guard ends the process."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        fd = os.dup(2)
    yield fd
    os.close(fd)


@pytest.fixture(autouse=True)
def hang_guard(terminal_fd):
    faulthandler.dump_traceback_later(60, exit=True, file=terminal_fd)
    yield
    faulthandler.cancel_dump_traceback_later()


def one_line_error(error_type, action):
    """Run ``action``; return the message of the ``error_type`` it raises, checking time and form."""
    start = time.perf_counter()
    with pytest.raises(error_type) as info:
        action()
    elapsed = time.perf_counter() - start
    assert elapsed < HANG_BOUND_S, f"took {elapsed:.1f} s"
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def saved_adapter(folder: Path, **config) -> Path:
    """A small LoRA adapter on tiny BERT, saved in ``folder``."""
    config = {"r": 2, "target_modules": ["query"], **config}
    get_adapter_model(tiny_bert(), LoraConfig(**config)).save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    data = json.loads((folder / files.CONFIG_NAME).read_text())
    data.update(changes)
    (folder / files.CONFIG_NAME).write_text(json.dumps(data))


def wrapped_ranks(model: AdapterModel) -> dict[str, int]:
    return {n: m.adapters["default"].r for n, m in model.base_model.named_modules() if isinstance(m, AdapterLayer)}


# -- crafted regexes ---------------------------------------------------------------------------------------------
REFUSED_PATTERNS = [
    pytest.param(
        dict(target_modules=LAZY_NESTED), ConfigError, r"target_modules=.*took more than .* s to match.*simplify",
        id="target_modules-timeout",
    ),
    pytest.param(
        dict(exclude_modules=LAZY_NESTED), ConfigError, r"exclude_modules=.*took more than .* s to match.*simplify",
        id="exclude_modules-timeout",
    ),
    pytest.param(
        dict(rank_pattern={LAZY_NESTED: 2}), ConfigError, r"rank_pattern=.*took more than .* s to match.*simplify",
        id="rank_pattern-timeout",
    ),
    pytest.param(
        dict(target_modules=NESTED), TargetError, r"matched nothing in BertForSequenceClassification",
        id="target_modules-nested",
    ),
    pytest.param(
        dict(layers_pattern=NESTED, layers_to_transform=[0]), TargetError, r"layers_pattern=.*matched nothing",
        id="layers_pattern-nested",
    ),
    pytest.param(
        dict(target_modules="(?:a{1000}){1000}"), ConfigError, r"expands to more than .* simplify", id="huge-repeat"
    ),
    pytest.param(
        dict(target_modules="(" * 2000 + "query" + ")" * 2000), ConfigError, r"nests groups too deeply", id="deep"
    ),
    pytest.param(dict(target_modules="query|" * 3000 + "key"), ConfigError, r"is too long \(at most", id="long"),
    pytest.param(dict(target_modules="query("), ConfigError, r"not a valid regular expression", id="invalid"),
]


@pytest.mark.parametrize("fields, error, message", REFUSED_PATTERNS)
def test_crafted_pattern_through_get_adapter_model_is_refused_in_bounded_time(fields, error, message):
    fields = {"target_modules": ["query"], **fields}
    bert = tiny_bert()
    text = one_line_error(error, lambda: get_adapter_model(bert, LoraConfig(r=2, **fields)))
    assert re.search(message, text), text
    assert not any(isinstance(m, AdapterLayer) for m in bert.modules())


@pytest.mark.parametrize("fields, error, message", REFUSED_PATTERNS)
def test_crafted_pattern_in_adapter_config_json_is_refused_in_bounded_time(fields, error, message, tmp_path):
    folder = saved_adapter(tmp_path)
    edit_config(folder, **fields)
    text = one_line_error(error, lambda: AdapterModel.from_pretrained(tiny_bert(), folder))
    assert re.search(message, text), text


def test_crafted_pattern_that_matches_nothing_is_harmless(tmp_path):
    """Slow in `re`, instant here: the adapter is built as if the pattern were absent."""
    start = time.perf_counter()
    config = LoraConfig(r=4, target_modules=["query"], exclude_modules=NESTED, rank_pattern={NESTED: 2})
    model = get_adapter_model(tiny_bert(), config)
    assert set(wrapped_ranks(model).values()) == {4} and len(wrapped_ranks(model)) == 2
    model.save_pretrained(tmp_path)
    assert wrapped_ranks(AdapterModel.from_pretrained(tiny_bert(), tmp_path)) == wrapped_ranks(model)
    assert time.perf_counter() - start < HANG_BOUND_S


def test_crafted_fused_slices_key_is_refused_in_bounded_time():
    config = MTLoraConfig(r=2, target_modules=["c_attn"])
    config.fused_slices = {LAZY_NESTED: 3}  # as if edited after validation: matching checks again
    text = one_line_error(ConfigError, lambda: get_adapter_model(tiny_gpt2(), config))
    assert re.search(r"fused_slices=.*took more than .* s to match.*simplify", text), text


def test_pattern_slow_only_on_a_real_module_name_is_stopped_while_matching():
    pattern = "Q" + LAZY_NESTED  # fails at once on the probe names (they do not start with Q)
    matching.compile_pattern(pattern, "target_modules")
    name = "Qbert.encoder.layer.0.attention.self.query_key_value"
    text = one_line_error(ConfigError, lambda: matching.matches(name, pattern, "target_modules"))
    assert "target_modules=" in text and repr(name) in text and "simplify" in text


def test_long_pattern_is_shown_shortened_in_the_message():
    text = one_line_error(ConfigError, lambda: HRAConfig(target_modules="a|" * 6000 + "b"))
    assert len(text) < 600


NORMAL_PATTERNS = [
    r".*layer\.0\.attention\.self\.(query|key)",
    r".*\.(query|value)",
    r"bert\.encoder\.layer\.\d+\.output\.dense",
    r"^(?!.*attention).*dense$",  # lookahead: RE2 would refuse it
    r"(?i).*QUERY",
    r".*(?<=self\.)key",
    r"classifier|bert\.pooler\.dense",
    "query",
    r"[a-z_.0-9]+intermediate\.dense",
]


@pytest.mark.parametrize("pattern", NORMAL_PATTERNS)
def test_matching_agrees_with_python_re_on_normal_patterns(pattern):
    names = [n for n, _ in tiny_bert().named_modules() if n]
    assert [n for n in names if matching.matches(n, pattern)] == [n for n in names if re.fullmatch(pattern, n)]


def test_suffix_lists_and_layer_index():
    assert matching.matches("bert.encoder.layer.0.attention.self.query", ["query"])
    assert not matching.matches("bert.encoder.layer.0.attention.self.query", ["uery"])
    assert not matching.matches("x.query", None)
    assert matching.layer_index("bert.encoder.layer.11.output.dense", None) == 11
    assert matching.layer_index("transformer.h.3.attn.c_attn", "h") == 3
    assert matching.layer_index("transformer.h.3.attn.c_attn", ["layer", "blocks"]) is None
    assert matching.layer_index("model.layers.2.mlp", "model.layers") == 2
    assert matching.first_match("a.b.query", ["key", "query", ".*"], "rank_pattern") == "query"
    assert matching.first_match("a.b.query", [r"a\..*", "query"], "rank_pattern") == r"a\..*"
    assert matching.first_match("a.b.query", ["value"], "rank_pattern") is None


# -- safetensors files crafted by hand -------------------------------------------------------------------------
def safetensors_file(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


CRAFTED_SAFETENSORS = {
    "huge-shape": safetensors_file(
        {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "shape-beyond-the-data": safetensors_file(
        {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "offsets-past-the-end": safetensors_file(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**12]}}, b"\0" * 16
    ),
    "huge-header-length": struct.pack("<Q", 2**62) + b"{}",
    "header-not-JSON": struct.pack("<Q", 4) + b"\xff\xfe{[",
    "three-bytes": b"abc",
    "truncated": safetensors_bytes({"w": torch.ones(64)})[:200],
}


@pytest.mark.parametrize("content", CRAFTED_SAFETENSORS.values(), ids=CRAFTED_SAFETENSORS.keys())
def test_crafted_safetensors_file_is_refused_without_allocating(content, tmp_path):
    folder = saved_adapter(tmp_path)
    (folder / files.WEIGHTS_NAME).write_bytes(content)
    text = one_line_error(AdapterLoadError, lambda: AdapterModel.from_pretrained(tiny_bert(), folder))
    assert "is not a readable safetensors file" in text and "corrupt" in text


# -- adapter_config.json with unexpected types -------------------------------------------------------------------
BAD_CONFIGS = [
    (dict(r="8"), r"r must be a positive integer; got '8'"),
    (dict(r=True), r"r must be a positive integer; got True"),
    (dict(r={"a": [1, {"b": None}]}), r"r must be a positive integer"),
    (dict(target_modules=5), r"target_modules must be a list of module-name suffixes"),
    (dict(target_modules=["query", {"a": 1}]), r"target_modules must be a list"),
    (dict(exclude_modules={"a": 1}), r"exclude_modules must be a list"),
    (dict(rank_pattern={"x": "a"}), r"rank_pattern\['x'\] must be a positive integer"),
    (dict(rank_pattern=["query"]), r"rank_pattern must be a dict"),
    (dict(rank_pattern={"": 2}), r"rank_pattern keys must be non-empty"),
    (dict(modules_to_save="classifier"), r"modules_to_save must be a list of module names; got 'classifier'"),
    (dict(modules_to_save=[["classifier"]]), r"modules_to_save must be a list of module names"),
    (dict(bias=3), r"bias=3 is not supported"),
    (dict(method="dora"), r"names method 'dora', which this peftlab does not know"),
    (dict(method=["lora"]), r"names method \['lora'\], which this peftlab does not know"),
    (dict(layers_to_transform=2.5), r"layers_to_transform must be"),
    (dict(layers_to_transform=[True]), r"layers_to_transform must be"),
    (dict(layers_to_transform={"0": 1}), r"layers_to_transform must be"),
    (dict(layers_pattern=5), r"layers_pattern must be"),
    (dict(layers_pattern=[None]), r"layers_pattern must be"),
    (dict(evil={"__class__": "os.system"}), r"has no field\(s\) \['evil'\]"),
]


@pytest.mark.parametrize(
    "changes, message", BAD_CONFIGS, ids=[json.dumps(c, separators=(",", ":")) for c, _ in BAD_CONFIGS]
)
def test_adapter_config_json_with_unexpected_types_gives_a_config_error(changes, message, tmp_path):
    folder = saved_adapter(tmp_path)
    edit_config(folder, **changes)
    text = one_line_error(ConfigError, lambda: AdapterModel.from_pretrained(tiny_bert(), folder))
    assert re.search(message, text), text


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "should hold a JSON object, found list"),
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
        ('{"r": ' + "9" * 5000 + "}", "is not valid JSON"),
        ("\xff\xfe", "is not valid JSON"),
        ("", "is not valid JSON"),
    ],
    ids=["list", "deep", "long-int", "not-utf-8", "empty"],
)
def test_adapter_config_json_that_is_not_a_json_object_gives_a_load_error(content, message, tmp_path):
    folder = saved_adapter(tmp_path)
    (folder / files.CONFIG_NAME).write_bytes(content.encode("latin-1"))
    text = one_line_error(AdapterLoadError, lambda: AdapterModel.from_pretrained(tiny_bert(), folder))
    assert message in text and len(text) < 600


def test_every_bad_config_error_is_a_peftlab_error():
    for changes, _ in BAD_CONFIGS:
        data = {**LoraConfig(target_modules=["query"]).to_dict(), **changes}
        with pytest.raises(PeftlabError):
            AdapterConfig.from_dict(data)


# -- pickled adapter_model.bin -----------------------------------------------------------------------------------
def pickle_folder(folder: Path, obj=None, raw: bytes | None = None) -> Path:
    """An adapter folder whose tensors are in ``adapter_model.bin`` (torch.save of ``obj``, or ``raw``)."""
    saved_adapter(folder)
    (folder / files.WEIGHTS_NAME).unlink()
    if raw is not None:
        (folder / files.PICKLE_WEIGHTS_NAME).write_bytes(raw)
    else:
        torch.save(obj, folder / files.PICKLE_WEIGHTS_NAME)
    return folder


class Payload:
    """A class a weights-only load must refuse."""


def test_pickle_holding_the_tensors_loads(tmp_path):
    source = get_adapter_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    state = source.adapter_state_dict()
    folder = pickle_folder(tmp_path, state)
    loaded = files.load_tensors(folder)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "obj, message",
    [
        ([torch.ones(2)], r"holds a list, not a dict of tensors keyed by parameter name"),
        (torch.ones(2), r"holds a Tensor, not a dict of tensors"),
        ({1: torch.ones(2)}, r"key 1 \(int\) is not a string"),
        ({"a.weight": 3}, r"'a.weight' holds a int, not a tensor"),
        ({"a.weight": {"nested": torch.ones(2)}}, r"'a.weight' holds a dict, not a tensor"),
    ],
    ids=["list", "tensor", "int-key", "int-value", "nested-dict"],
)
def test_pickle_with_unexpected_structure_gives_a_load_error(obj, message, tmp_path):
    folder = pickle_folder(tmp_path, obj)
    text = one_line_error(AdapterLoadError, lambda: AdapterModel.from_pretrained(tiny_bert(), folder))
    assert re.search(message, text), text
    assert str(folder / files.PICKLE_WEIGHTS_NAME) in text


UNSAFE_ADVICE = re.compile(r"weights_only.{0,20}(False|=\s*False)|add_safe_globals|safe_globals|\btrust", re.I)


@pytest.mark.parametrize(
    "payload, refused",
    [
        (dict(obj={"a.weight": Payload()}), f"{__name__}.Payload"),
        (dict(obj={"a.weight": torch.ones(1), "f": os.system}), "system"),
        (dict(raw=pickle.dumps({"a": print}, protocol=2)), "print"),
        (dict(raw=b"garbage, not a pickle"), None),
        (dict(raw=b""), None),
    ],
    ids=["class-instance", "function", "raw-pickle", "garbage", "empty"],
)
def test_refused_pickle_never_advises_unsafe_loading(payload, refused, tmp_path):
    folder = pickle_folder(tmp_path, **payload)
    start = time.perf_counter()
    with pytest.raises(AdapterLoadError) as info:
        AdapterModel.from_pretrained(tiny_bert(), folder)
    assert time.perf_counter() - start < HANG_BOUND_S
    text = str(info.value)
    assert "\n" not in text and not UNSAFE_ADVICE.search(text), text
    assert "peftlab never unpickles arbitrary objects" in text and "re-save the adapter as safetensors" in text
    if refused:
        assert "holds Python objects that a weights-only load refuses" in text and refused in text
    assert info.value.__cause__ is None or not UNSAFE_ADVICE.search(str(info.value.__cause__))


# -- symbolic links ---------------------------------------------------------------------------------------------
needs_symlinks = pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")


@needs_symlinks
@pytest.mark.parametrize("file", [files.WEIGHTS_NAME, files.CONFIG_NAME])
def test_symlink_pointing_outside_the_adapter_folder_is_refused(file, tmp_path):
    outside = saved_adapter(tmp_path / "elsewhere")
    folder = saved_adapter(tmp_path / "adapter")
    (folder / file).unlink()
    (folder / file).symlink_to(outside / file)
    text = one_line_error(AdapterLoadError, lambda: AdapterModel.from_pretrained(tiny_bert(), folder))
    assert f"{folder / file} is a symbolic link to {(outside / file).resolve()}, outside the folder" in text


@needs_symlinks
def test_symlink_chain_that_ends_outside_is_refused_and_dangling_link_named(tmp_path):
    outside = saved_adapter(tmp_path / "elsewhere")
    folder = saved_adapter(tmp_path / "adapter")
    (folder / "sub").mkdir()
    (folder / "sub" / "hop").symlink_to(outside / files.WEIGHTS_NAME)
    (folder / files.WEIGHTS_NAME).unlink()
    (folder / files.WEIGHTS_NAME).symlink_to(Path("sub") / "hop")
    text = one_line_error(AdapterLoadError, lambda: files.load_tensors(folder))
    assert "symbolic link" in text and "outside the folder" in text
    (folder / files.CONFIG_NAME).unlink()
    (folder / files.CONFIG_NAME).symlink_to("/nonexistent/secret.json")
    text = one_line_error(AdapterLoadError, lambda: files.read_json(folder / files.CONFIG_NAME))
    assert "symbolic link" in text and "outside the folder" in text


@needs_symlinks
def test_symlinks_that_stay_inside_are_followed(tmp_path):
    real = saved_adapter(tmp_path / "real")
    (real / "files").mkdir()
    for file in (files.WEIGHTS_NAME, files.CONFIG_NAME):
        (real / file).rename(real / "files" / file)
        (real / file).symlink_to(Path("files") / file)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)  # the folder itself may be a link
    for folder in (real, tmp_path / "link"):
        assert wrapped_ranks(AdapterModel.from_pretrained(tiny_bert(), folder))


@needs_symlinks
def test_hugging_face_hub_cache_layout_is_followed(tmp_path):
    """``snapshots/<revision>/<file>`` links to ``../../blobs/<hash>`` in a downloaded repository."""
    source = saved_adapter(tmp_path / "source")
    repo = tmp_path / "models--someone--adapter"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate((files.WEIGHTS_NAME, files.CONFIG_NAME)):
        (source / file).rename(repo / "blobs" / f"blob{i}")
        (snapshot / file).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    assert wrapped_ranks(AdapterModel.from_pretrained(tiny_bert(), snapshot))


# -- file modes and the single atomic writer --------------------------------------------------------------------
@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_files_are_written_with_the_umask_mode(umask, tmp_path):
    expected = 0o666 & ~umask
    get_adapter_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path / "a")
    files.atomic_write_json(tmp_path / "metrics.json", {"accuracy": 1.0})
    cache.atomic_write_bytes(tmp_path / "data.bin", b"x")
    for path in (tmp_path / "a" / files.CONFIG_NAME, tmp_path / "a" / files.WEIGHTS_NAME, tmp_path / "metrics.json",
                 tmp_path / "data.bin"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "data.bin", "metrics.json"]  # no temporary left


def test_one_atomic_writer():
    assert cache.atomic_write_bytes is files.atomic_write_bytes


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    files.atomic_write_bytes(path, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
