"""Tiny wheels and sdists written by hand, for tests that install packages without any index.

A wheel is a zip with a ``.dist-info`` (METADATA, WHEEL, RECORD); writing one takes a millisecond
and needs no build backend, so no test depends on the public package index.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(folder: Path, name: str, version: str, code: str = "VALUE = 1\n",
                extra: dict[str, bytes] | None = None, requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel ``name-version-py3-none-any.whl`` whose package ``name`` holds
    ``code``; ``extra`` adds files inside the package (e.g. bulk data)."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files: dict[str, bytes] = {
        f"{module}/__init__.py": code.encode(),
        **{f"{module}/{k}": v for k, v in (extra or {}).items()},
        f"{dist}.dist-info/METADATA": metadata.encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: decompute-tests\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    path = Path(folder) / f"{dist}-py3-none-any.whl"
    record = [f"{n},{_record_hash(c)},{len(c)}" for n, c in files.items()]
    record.append(f"{dist}.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as z:
        for n, c in files.items():
            z.writestr(n, c)
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def write_sdist(folder: Path, name: str, version: str, setup_py: str) -> Path:
    """A source distribution ``name-version.tar.gz`` whose ``setup.py`` is ``setup_py``: what
    an installer would have to *run* to install it."""
    base = f"{name}-{version}"
    path = Path(folder) / f"{base}.tar.gz"
    files = {
        f"{base}/setup.py": setup_py.encode(),
        f"{base}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
    }
    with tarfile.open(path, "w:gz") as tar:
        for n, c in files.items():
            info = tarfile.TarInfo(n)
            info.size = len(c)
            tar.addfile(info, io.BytesIO(c))
    return path
