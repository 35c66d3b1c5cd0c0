"""Output paths: checked before any compute, written atomically, never left half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


def _writable_ancestor(p: Path, what: str) -> None:
    """The nearest existing ancestor of p must be a directory we can create files in (tried, not guessed:
    permission bits say nothing for root or read-only mounts)."""
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{what} {p}: {anc} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".r2q-probe-")
    except OSError as e:
        raise UserError(f"{what} {p}: cannot write in {anc} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_out_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """An output directory: absent (created later) or a directory, and writable. Nothing is created here."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p}: exists and is a file, not a directory")
    _writable_ancestor(p, what)
    return p


def check_out_file(path: str | os.PathLike, what: str) -> Path:
    """An output file: not a directory, in a directory we can write (created later if absent)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {p}: is a directory; give a file name")
    if not p.name:
        raise UserError(f"{what}: give a file name")
    _writable_ancestor(p.parent if str(p.parent) else Path("."), what)
    return p


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write to a temp file beside `path`, then rename over it: readers see the old file or the new one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it (mkstemp makes 0600)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
