"""Output paths: checked before any compute, written atomically (a link at the path is replaced, never written
through), never left half-written; a run's directory locked against a second run; a full or read-only disk said in
one line."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def check_nonblank(out: str | os.PathLike, what: str = "--out") -> None:
    """An empty --out would mean the current directory: refused, as a mistake (an unset variable, a lost quote)."""
    if isinstance(out, str) and not out.strip():
        raise UserError(f"{what} is empty: give the output directory (for the current directory, say '.')")


def check_out_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """An output directory: named (not ""), absent (created later) or a directory, and writable. Nothing is created
    here."""
    check_nonblank(path, what)
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


def check_outputs_spare_inputs(outputs: list[tuple[str, str | os.PathLike]], files: list[tuple[str, str | os.PathLike]],
                               dirs: list[tuple[str, str | os.PathLike]]) -> None:
    """Output files (option, path) must be distinct, none of them an input (a `files` entry, or any file inside one
    that is a directory: a data set), and none a file that loading an input model directory (`dirs`) reads: its
    weights, configs, tokenizer, record or code (writing it would destroy the model; another file there, such as a
    credit.json of an earlier call, is fine). An output is where the write lands: writes replace a link at the path
    rather than follow it, so an output's own link is not resolved (its directory is); inputs are, fully. A
    UserError names both options."""
    seen: dict[Path, str] = {}
    for flag, path in outputs:
        at = Path(path).parent.resolve() / Path(path).name
        if at in seen:
            raise UserError(f"{seen[at]} and {flag} are the same file {path}: give each its own")
        seen[at] = flag
        for what, src in files:
            if not src or not Path(src).exists():
                continue
            src_at = Path(src).resolve()
            if src_at == at or (src_at.is_dir() and src_at in at.parents and at.exists()):
                raise UserError(f"{flag} {path} is {'the' if src_at == at else 'a file of the'} {what} "
                                f"{'file' if src_at == at else 'directory'}: writing it would replace the input; "
                                "choose another path")
        for what, d in [*dirs, *_adapter_bases(dirs)]:
            if d and Path(d).is_dir() and Path(d).resolve() == at.parent and _loaded(at):
                raise UserError(f"{flag} {path} is a file of the {what} directory {d} that loading it reads: writing "
                                "it would damage the model; choose another path")


# the files a model directory is loaded from (weights, configs, tokenizer, adapters, r2q's record and manifests, and
# the code a --trust-remote-code load runs)
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".jinja", ".py")
_MODEL_FILES = {"config.json", "generation_config.json", "adapter_config.json", "r2q_config.json", "manifest.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "vocab.txt", "merges.txt", "chat_template.json", "model.safetensors.index.json",
                "pytorch_model.bin.index.json", "preprocessor_config.json"}


def _adapter_bases(dirs: list[tuple[str, str | os.PathLike]]) -> list[tuple[str, str]]:
    """The base model directories of the LoRA adapters among `dirs` (loading an adapter loads its base too)."""
    import json

    out = []
    for what, d in dirs:
        cfg = Path(d) / "adapter_config.json" if d else None
        try:
            base = json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg and cfg.is_file() else None
        except (OSError, ValueError, AttributeError):
            base = None
        if isinstance(base, str) and base:
            out.append((f"{what}'s base model", base))
    return out


def _loaded(p: Path) -> bool:
    """Whether a file in a model directory is one that loading the model (or its tokenizer) reads."""
    return p.name in _MODEL_FILES or p.suffix in _MODEL_SUFFIXES


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write to a temp file beside `path`, then rename over it: readers see the old file or the new one, and a
    symlink at `path` is replaced, not followed. Temp files of earlier writers that were killed are removed."""
    p = Path(path)
    with writing(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(p)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.{os.getpid()}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it (mkstemp makes 0600)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return p


def _remove_stale_temps(p: Path) -> None:
    """`.NAME.<pid>-*.tmp` files beside p whose writer process no longer exists (killed mid-write)."""
    for t in p.parent.glob(f".{p.name}.*-*.tmp"):
        pid = t.name[len(p.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            t.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log file, never through a symlink: a link at `path` is replaced by a regular file."""
    p = Path(path)
    with writing(p):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(p, flags, 0o666)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            p.unlink()
            fd = os.open(p, flags, 0o666)
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")


def save_into(out: Path, save: Callable[[Path], None]) -> list[Path]:
    """Let `save(dir)` write files (e.g. transformers' save_pretrained) into a temp dir inside `out`, then rename
    each over its path in `out`: a symlink planted under `out` is replaced, not written through, and a failed save
    leaves no temp dir. Returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-save-"))
    with writing(out, cleanup=tmp):
        save(tmp)
        done = []
        for f in sorted(tmp.iterdir()):
            target = out / f.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(f, target)
            done.append(target)
        tmp.rmdir()
    return done


_NO_SPACE = ("no space left on device", "os error 28", "disk quota exceeded")


def disk_error(path: str | os.PathLike, e: BaseException, need: int | None = None) -> UserError | None:
    """The one-line error for a write of `path` that failed for want of room or permission, or None when `e` is
    something else (a bug, to be raised as it is). Covers OSError and the errors safetensors raises with the OS
    error's text."""
    text = str(e).lower()
    code = e.errno if isinstance(e, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT) or any(x in text for x in _NO_SPACE):
        free = _free(Path(path))
        room = f" ({_size(free)} free" + (f", about {_size(need)} needed)" if need else ")") if free is not None else ""
        return UserError(f"cannot write {path}: no space left on the device{room}")
    if code == errno.EROFS or "read-only file system" in text:
        return UserError(f"cannot write {path}: the file system is read-only")
    if code in (errno.EACCES, errno.EPERM) or "permission denied" in text:
        return UserError(f"cannot write {path}: permission denied")
    return None


@contextmanager
def writing(path: str | os.PathLike, need: int | None = None, cleanup: Path | None = None) -> Iterator[None]:
    """Around a write of `path`: a full or read-only disk becomes one UserError naming the path and the free space;
    `cleanup` (a temp file or dir) is removed whatever went wrong."""
    try:
        yield
    except Exception as e:
        if cleanup is not None:
            if cleanup.is_dir():
                shutil.rmtree(cleanup, ignore_errors=True)
            else:
                cleanup.unlink(missing_ok=True)
        err = None if isinstance(e, UserError) else disk_error(path, e, need)
        if err is None:
            raise
        raise err from e


def _free(p: Path) -> int | None:
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


class RunLock:
    """An advisory lock on DIR/.lock (fcntl.flock), held for a whole run, so that two runs never write one
    directory: the second stops at once with one line naming the first's pid. The kernel releases it when the
    process ends, however it ends; the file stays (removing it would race with a new run taking it)."""

    def __init__(self, d: Path, what: str = "--out"):
        self.d, self.what, self.fd, self.created = Path(d), what, None, False

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks to take
            return self
        path = self.d / ".lock"
        with writing(path):
            self.created = not self.d.exists()
            self.d.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(path, flags, 0o644)
            except OSError as e:  # a planted symlink: replaced, never followed
                if e.errno != errno.ELOOP:
                    raise
                path.unlink()
                fd = os.open(path, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.what} {self.d} is in use by another r2q run (pid {holder}); wait for it to "
                            f"finish or choose another {self.what}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self, undo: bool = False) -> None:
        """Unlock. undo: the run failed before writing anything; a directory the lock created is removed again
        (if it holds nothing but the lock file), so bad input leaves nothing behind."""
        if self.fd is not None:
            import fcntl

            if undo and self.created and [p.name for p in self.d.iterdir()] == [".lock"]:
                (self.d / ".lock").unlink()
                self.d.rmdir()
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
