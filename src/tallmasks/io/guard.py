"""One guard for the files that every command reads and writes.

Reading: only regular files are opened; a named pipe, socket or device is refused before it is opened.

Writing: an output is refused before any work when it is one of the command's inputs (the same file by
device and inode, whatever its name) or lies inside a folder the command reads, when its location cannot
be written, or when the file system lacks room for its expected size. It is written to a temporary named
after it (``.<name>.<host>-<pid>-<random>.tmp`` in the same folder) and renamed into place; temporaries
of the same output left by a process that no longer runs are removed on the next write; new files and
folders get the permissions that the umask allows; a failed write becomes one ``OutputError`` line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tallmasks.core.errors import CheckpointError, ConfigError, OutputError, TallmasksError, one_line

PathLike = str | os.PathLike

#: errno values that mean "this location cannot take the output"
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG, errno.ENOTDIR, errno.ENOENT}
)
#: temporaries in the format of earlier versions (no owner recorded) are removed once this old
LEGACY_TEMP_AGE_S = 3600.0
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------------------------
# inputs


def require_file(path: PathLike, what: str = "checkpoint", error: type[TallmasksError] = CheckpointError) -> Path:
    """``path`` if it is a regular file; a one-line ``error`` when it is missing, a folder, a pipe or a device."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or one_line(exc)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path}: is a folder, expected a {what} file")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: not a regular file (a named pipe, socket or device); refused")
    return path


# ---------------------------------------------------------------------------------------------
# names from data that become file names

#: the longest file-name component a name from data may become (ext4, xfs and APFS allow 255 bytes)
MAX_NAME_BYTES = 200
_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def safe_name(name: object, what: str = "name", error: type[TallmasksError] = ConfigError) -> str:
    """``name`` when it can be one file-name component as it is: a non-empty string of at most
    ``MAX_NAME_BYTES`` UTF-8 bytes with no path separator (``/`` or ``\\``), no control character, that is not
    ``.`` or ``..`` and does not start with ``.`` (no hidden file, no temporary's pattern). Every path that a
    command builds from data (a model, task or method name, ``--names``) goes through this rule; anything
    else is a one-line ``error``, before any work."""
    if not isinstance(name, str):
        raise error(f"{what} must be a string to name a file, got {type(name).__name__}")
    shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
    if not name or name.startswith("."):
        raise error(f"{what} {shown} cannot name a file (empty, '.', '..' or starting with '.')")
    if _UNSAFE_NAME.search(name):
        raise error(f"{what} {shown} cannot name a file (a path separator or a control character); use a plain name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise error(f"{what} {shown} cannot name a file (longer than {MAX_NAME_BYTES} bytes)")
    return name


# ---------------------------------------------------------------------------------------------
# outputs: checks before the work


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _within(child: Path, folder: Path) -> bool:
    child, folder = child.resolve(), folder.resolve()
    return child == folder or folder in child.parents


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def check_output(
    path: PathLike,
    inputs: Iterable[PathLike] = (),
    expected_bytes: int = 0,
    folder: bool = False,
    label: str = "output",
) -> Path:
    """Refuse, in one line and before any work, an output that is one of ``inputs`` (same inode) or lies
    inside an input folder, an existing non-regular file, an unwritable location, or one without room
    for ``expected_bytes``. ``folder``: the output is a folder. Returns the path (``~`` expanded)."""
    path = Path(path).expanduser()
    where = f"{label} {path}"
    info = _stat(path)
    if info is not None:
        if folder and not stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{where}: exists and is not a folder")
        if not folder and stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{where}: is a folder, expected a file name")
        if not folder and not stat.S_ISREG(info.st_mode):
            raise OutputError(f"{where}: exists and is not a regular file (a named pipe, socket or device); refused")
    for source in inputs:
        source = Path(source).expanduser()
        source_info = _stat(source)
        if source_info is None:
            continue
        if stat.S_ISDIR(source_info.st_mode):
            if _within(path, source):
                raise OutputError(f"{where}: lies inside {source}, which this command reads; choose another location")
        elif info is not None and (info.st_dev, info.st_ino) == (source_info.st_dev, source_info.st_ino):
            raise OutputError(f"{where}: is one of this command's inputs ({source}); choose another name")
    location = _existing_ancestor(path if folder else path.parent)
    if not location.is_dir():
        raise OutputError(f"{where}: {location} is a file, not a folder")
    _probe(location, path, where)
    if expected_bytes > 0:
        free = shutil.disk_usage(location).free
        if free < expected_bytes:
            raise OutputError(f"{where}: needs about {_megabytes(expected_bytes)}, only {_megabytes(free)} free in {location}")
    return path


def _probe(location: Path, path: Path, where: str) -> None:
    """Create and remove an empty file in ``location``: the one reliable test of writability."""
    probe = location / _temp_name(path)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{where}: cannot write in {location} ({exc.strerror or one_line(exc)})") from None


def file_size(path: PathLike) -> int:
    """Size in bytes of a file (0 when it cannot be read): an estimate of an output's size."""
    info = _stat(Path(path).expanduser())
    return info.st_size if info is not None else 0


# ---------------------------------------------------------------------------------------------
# outputs: writing


def _temp_name(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _is_stale(rest: str, entry: os.DirEntry) -> bool:
    ours = re.fullmatch(r"([0-9a-f]{8})-(\d+)-[0-9a-f]+", rest)
    if ours:
        return ours.group(1) == _HOST and not _alive(int(ours.group(2)))
    if re.fullmatch(r"[A-Za-z0-9_]{8}", rest):  # mkstemp names of earlier versions
        with contextlib.suppress(OSError):
            return time.time() - entry.stat(follow_symlinks=False).st_mtime > LEGACY_TEMP_AGE_S
    return False


def remove_stale_temporaries(path: PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by processes that no longer run; returns what was removed."""
    path = Path(path)
    prefix, removed = f".{path.name}.", []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")) or not _is_stale(name[len(prefix) : -4], entry):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def make_folder(path: PathLike, label: str = "output") -> Path:
    """``mkdir -p`` with permissions from the umask; failures as one OutputError line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{label} {path}: cannot create the folder ({exc.strerror or one_line(exc)})") from None
    return path


def write_failure(exc: BaseException, path: Path) -> OutputError | None:
    """The one-line OutputError for an exception raised while writing ``path``; None if it is not a write failure."""
    if isinstance(exc, (TallmasksError, KeyboardInterrupt, SystemExit)):
        return None
    reason = None
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        if exc.filename is not None and Path(os.path.abspath(path.parent)) not in Path(os.path.abspath(exc.filename)).parents:
            return None  # about another file (an input read inside the block)
        reason = exc.strerror or os.strerror(exc.errno)
    else:
        text = str(exc)
        code = re.search(r"code: (\d+)", text)  # safetensors: IoError(Os { code: 28, ... })
        if code and type(exc).__name__ == "SafetensorError":
            reason = os.strerror(int(code.group(1)))
        elif type(exc).__name__ == "SafetensorError" or (isinstance(exc, RuntimeError) and _torch_write_error(exc)):
            full = shutil.disk_usage(_existing_ancestor(path.parent)).free < (1 << 20)
            reason = os.strerror(errno.ENOSPC) if full else one_line(exc, 160)
    return None if reason is None else OutputError(f"{path}: cannot write it ({reason})")


def _torch_write_error(exc: BaseException) -> bool:
    """torch.save's failures to write: 'file write failed', or an iostream error surfacing as an
    'enforce fail' of its zip writer (inline_container.cc)."""
    while exc is not None:
        text = str(exc).lower()
        if "write" in text or "enforce fail" in text or "iostream" in text:
            return True
        exc = exc.__context__
    return False


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (named after it); rename it onto ``path`` only if the block
    succeeds. Parents are created; a write failure is one OutputError line and leaves nothing behind."""
    path = Path(path)
    make_folder(path.parent)
    remove_stale_temporaries(path)
    tmp = path.parent / _temp_name(path)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode 0666 & ~umask
    except OSError as exc:
        raise OutputError(f"{path}: cannot write it ({exc.strerror or one_line(exc)})") from None
    try:
        yield tmp
        if not tmp.is_dir():
            os.chmod(tmp, 0o666 & ~current_umask())  # some writers recreate the file with mode 0600
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        failure = write_failure(exc, path)
        if failure is not None:
            raise failure from None
        raise


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def preallocate(path: PathLike, size: int) -> None:
    """Reserve ``size`` bytes for ``path`` so that a full disk fails here (ENOSPC), not later in a memory map (SIGBUS)."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: a full disk then fails on write
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, int(size))
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
