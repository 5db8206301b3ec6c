"""Saving and loading adapter files: safetensors + JSON, written atomically, read as untrusted input.

Design notes: ``docs/design.md``, section peftlab.files.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from peftlab.errors import AdapterLoadError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


TEMP_TOKEN_BYTES = 6
# The name of atomic_write_bytes' temporary file (".<name>.<12 hex digits>.tmp"): what a crash can leave behind.
TEMPORARY_FILE = re.compile(rf"\..+\.[0-9a-f]{{{2 * TEMP_TOKEN_BYTES}}}\.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (atomic on POSIX); return the path.

    The file gets mode ``0o666 & ~umask`` like any file ``open()`` creates (``tempfile.mkstemp`` would
    give ``0o600``): the kernel applies the umask to the temporary file, so no process-wide umask is read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(TEMP_TOKEN_BYTES)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary file next to {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as standard JSON, atomically: numbers JSON cannot hold (NaN, ±inf: a diverged run's loss)
    become the strings ``"nan"`` / ``"inf"`` / ``"-inf"`` and 0-d tensors / numpy scalars plain numbers, so
    every reader (``jq``, JavaScript, strict parsers) can read the file."""
    text = json.dumps(jsonable(data), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as strings and ``.item()``-able scalars as Python numbers (recursively)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return jsonable(value.item())
    return value


def atomic_write_jsonl(path: str | os.PathLike, rows: Any) -> Path:
    """Write one JSON object a line (UTF-8), atomically."""
    return atomic_write_bytes(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())


def atomic_write_image(path: str | os.PathLike, image: Any, format: str = "PNG") -> Path:
    """Write a PIL image atomically (encoded in memory, then :func:`atomic_write_bytes`)."""
    buffer = BytesIO()
    image.save(buffer, format=format)
    return atomic_write_bytes(path, buffer.getvalue())


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of a grid of n images: the most square layout that fills every cell."""
    cols = next(c for c in range(math.ceil(math.sqrt(n)), n + 1) if n % c == 0)
    return n // cols, cols


def atomic_write_image_grid(path: str | os.PathLike, images: list[Any]) -> Path:
    """Write PIL images as one grid (``diffusers.utils.make_image_grid``, :func:`grid_shape`) atomically."""
    from diffusers.utils import make_image_grid

    return atomic_write_image(path, make_image_grid(list(images), *grid_shape(len(images))))


def atomic_write_folder(out: str | os.PathLike, write: Callable[[Path], Any], *, replace: bool = True) -> Path:
    """Create the folder ``out`` atomically: ``write(tmp)`` fills a temporary folder beside it, which is then
    renamed to ``out``, so a failed or killed write never leaves a half-written ``out``; return ``out``.

    ``replace=True``: an existing ``out`` is replaced (a saved pipeline, a merged model). ``replace=False``: an
    existing ``out`` is kept and ``write`` is not called (a cache entry; when another process finished the same
    entry first, its copy wins).
    """
    out = Path(out)
    if not replace and out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(tmp)
        old = None
        if replace and out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / "previous")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        if replace or not out.is_dir():  # keeping: a concurrent writer that won the race is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors are copied to contiguous CPU memory)."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(plain, metadata=metadata))


def _check_link(path: Path) -> None:
    """Refuse ``path`` if it is a symbolic link that resolves outside its folder (see the module docstring)."""
    if not path.is_symlink():
        return
    folder = path.parent.resolve()
    target = path.resolve()
    if target.is_relative_to(folder):
        return
    blobs = folder.parent.parent / "blobs"  # HF hub cache: <repo>/snapshots/<revision>/<file> -> <repo>/blobs/<hash>
    if folder.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink() and target.parent == blobs:
        return
    raise AdapterLoadError(
        f"{path} is a symbolic link to {target}, outside the folder {folder}; peftlab reads only files inside "
        "the folder, so that a shared adapter cannot make it read other files. Copy the file into the folder."
    )


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path`` (a file in an adapter or model folder), or AdapterLoadError."""
    path = Path(path)
    _check_link(path)
    if not path.is_file():
        raise AdapterLoadError(f"{path} does not exist; is {path.parent} an adapter folder saved by save_pretrained?")
    try:
        data = json.loads(path.read_text())
    except RecursionError:
        raise AdapterLoadError(f"{path} nests too deeply to be a config; the file is corrupt or crafted") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise AdapterLoadError(f"{path} is not valid JSON ({_short(err)}); the file is corrupt") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _short(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _load_pickle(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``, with errors that never pass on torch's advice to load unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types, for refused pickles and for files that are no archives
        message = str(err)
        found = re.search(r"\bGLOBAL ([\w.]+)", message)
        if found:
            what = f"holds Python objects that a weights-only load refuses ({found.group(1)})"
        elif isinstance(err, pickle.UnpicklingError) or "weights_only" in message:
            what = "cannot be read by a weights-only load (it is corrupt, or holds Python objects)"
        else:
            detail = f": {_short(err, 120)}" if message.strip() else ""
            what = f"is not a readable PyTorch weights file ({type(err).__name__}{detail})"
    raise AdapterLoadError(
        f"{path} {what}; peftlab never unpickles arbitrary objects; re-save the adapter as safetensors "
        f"({WEIGHTS_NAME})"
    )


def _check_tensor_dict(tensors: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(tensors, dict):
        raise AdapterLoadError(
            f"{path} holds a {type(tensors).__name__}, not a dict of tensors keyed by parameter name; "
            "it is not an adapter weights file"
        )
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise AdapterLoadError(
                f"{path}: key {key!r} ({type(key).__name__}) is not a string; an adapter weights file maps "
                "parameter names to tensors"
            )
        if not isinstance(value, Tensor):
            raise AdapterLoadError(
                f"{path}: {key!r} holds a {type(value).__name__}, not a tensor; an adapter weights file maps "
                "parameter names to tensors"
            )
    return tensors


def load_tensors(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The adapter tensors in ``folder``: safetensors, or a PEFT ``.bin`` read with weights_only=True."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    pickled = folder / PICKLE_WEIGHTS_NAME
    _check_link(path)
    if path.is_file():
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterLoadError(
                f"{path} is not a readable safetensors file ({_short(err)}); the file is corrupt"
            ) from None
    else:
        _check_link(pickled)
        if not pickled.is_file():
            raise AdapterLoadError(
                f"no {WEIGHTS_NAME} in {folder}; is it an adapter folder saved by save_pretrained?"
            )
        tensors = _check_tensor_dict(_load_pickle(pickled), pickled)
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterLoadError(f"{folder}: tensor {key} holds NaN or inf values; the adapter is corrupt")
    return tensors


def by_module(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A saved adapter's tensors (``<module>.<parameter>``) grouped by module: ``{module: {parameter: tensor}}``."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        module, _, name = key.rpartition(".")
        grouped.setdefault(module, {})[name] = value
    return grouped


def check_and_copy(params: dict[str, Tensor], tensors: dict[str, Tensor], source: str | os.PathLike) -> None:
    """Copy ``tensors`` into ``params`` after checking the key sets and shapes match exactly."""
    check_matching(params, tensors, source)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))


def check_matching(params: dict[str, Tensor], tensors: dict[str, Tensor], source: str | os.PathLike) -> None:
    """:class:`AdapterLoadError` unless ``tensors`` has exactly ``params``' keys, each with the same shape."""
    missing = [k for k in params if k not in tensors]
    unexpected = [k for k in tensors if k not in params]
    if missing:
        hint = f" (the file has e.g. {unexpected[0]})" if unexpected else ""
        raise AdapterLoadError(
            f"{source} has no tensor for {missing[0]} ({len(missing)} missing){hint}: the adapter was saved "
            "for a model whose module names differ from this one"
        )
    if unexpected:
        raise AdapterLoadError(
            f"{source} holds {unexpected[0]} ({len(unexpected)} unexpected), which this model's adapter "
            "does not have: the adapter was saved for a different model or config"
        )
    for key, param in params.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            module = key.rsplit(".", 1)[0]
            raise AdapterLoadError(
                f"{source}: module {module}: tensor {key} has shape {tuple(tensors[key].shape)} in the file but "
                f"{tuple(param.shape)} in this model; the adapter was trained on a different base model"
            )
