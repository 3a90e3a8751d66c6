"""Atomic writes: whoever reads a file (another process, or this one after a crash) sees the old
version whole or the new one whole, never a part. Every file the project writes for later (the
privacy ledger, kept updates, checkpoints, run summaries, caches, keys) goes through here; tensor files
are read back through :func:`read_tensors`, which names a damaged one and what to do."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write (a file or a folder). When the block
    ends without an error it takes ``path``'s place (a folder replaces the folder there); otherwise
    it is removed and ``path`` is untouched. The temporary name is hidden and unique to the process,
    so two writers never share one and globs over the folder never see it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def cache_root() -> Path:
    """Where built models, the public start and images extracted from data files are kept (``MEDVLM_CACHE``)."""
    return Path(os.environ.get("MEDVLM_CACHE", Path.home() / ".cache" / "medvlm-fl"))


def write_bytes(path: str | Path, data: bytes, *, durable: bool = False, mode: int = 0o644) -> Path:
    """Write ``data`` atomically (created with ``mode``); ``durable``: on disk before it replaces the
    old file (fsync), for records a power cut must not take back, such as privacy spending."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
    return Path(path)


def write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    return write_bytes(path, text.encode(), durable=durable)


def read_tensors(path: str | Path, remedy: str, *, framework: str = "pt") -> dict:
    """The tensors of a safetensors file; a file that is not one (cut short by a copy, damaged on disk, another
    format under the name) is a ValueError naming it, what safetensors said, and ``remedy``."""
    import importlib

    from safetensors import SafetensorError

    load_file = importlib.import_module(f"safetensors.{'torch' if framework == 'pt' else framework}").load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as tensors ({err}): the file is damaged or incomplete; {remedy}"
                         ) from None
