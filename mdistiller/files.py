"""Files every layer writes or finds: atomic writes (temporary file, fsync, rename) and paths inside the project.

Foundation code: imports nothing of the package but errors.py.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import MdistillerError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# DATASET.ROOT's default: the MDISTILLER_DATA environment variable, else ./data
DEFAULT_DATA_ROOT = os.environ.get("MDISTILLER_DATA", "./data")


def atomic_write(path: str, write: Callable[[Any], None], mode: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash or a full disk leaves either the previous file or the new one, never a truncated mix.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str, text: str) -> None:
    """Atomically write a text file; an OSError (full disk, read-only folder) becomes a one-line MdistillerError."""
    try:
        atomic_write(path, lambda f: f.write(text), "w")
    except OSError as exc:
        raise MdistillerError(f"could not write {path}: {exc.strerror or exc}; the previous file there is intact") \
            from None


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the temporary files an atomic write killed mid-way (SIGKILL, power loss) left in folder."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):  # mkstemp(prefix=".<name>.", suffix=".tmp")
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed



def resolve_project_path(path: str) -> str:
    """A relative path is looked up in the working directory, then in the project root (the zoo's layout)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    in_project = PROJECT_ROOT / path
    return str(in_project) if in_project.exists() else path


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
