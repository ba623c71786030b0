"""One mechanism for outputs: write under a temporary name, rename on success, remove on any failure.

Rules every writer relies on:

- One temporary name per output. A writer handed a path that is already an active temporary (a task's
  `ctx.output(...)` passed down to `write_sweep`, which uses `atomic_output` itself) writes into it
  directly: temporary names never nest, so the name the launcher was told about is the file on disk.
- The temporary name is announced (`add_listener`) before the writer starts, so a job launcher that
  has to kill its worker can still remove it.
- Success is checked: the file must exist, must reach the disk (fsync) and the disk must not have
  filled up while it was written (some writers, e.g. VTK's and ITK's NIfTI, report a short write only
  on the console). A full disk is `OutputWriteError` ("no space left on <the user's path>", exit 1);
  other failures keep their type but name the final path instead of the temporary one.
- `check_output_path` checks an output path before any work starts (folder, permission, extension).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ultrasound_ai.core.errors import InputError, OutputWriteError

PARTIAL_MARK = ".partial-"

_lock = threading.Lock()
_active: dict[str, Path] = {}  # absolute temporary path -> final path, in this process
_listeners: list[Callable[[Path, Path], None]] = []


def path_key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(os.fspath(path)))


def _temporary_sibling(path: Path) -> Path:
    # Same folder (rename stays atomic on one file system); keep the suffixes so writers that pick the
    # format from the extension (SimpleITK, h5py, PIL) still see it.
    suffixes = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffixes)] if suffixes else path.name
    return path.with_name(f".{stem}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}{suffixes}")


def add_listener(callback: Callable[[Path, Path], None]) -> Callable[[], None]:
    """Call `callback(temporary, final)` whenever a temporary output is about to be written.

    Returns a function that removes the listener. The job worker uses this to send "partial" events.
    """
    with _lock:
        _listeners.append(callback)

    def remove() -> None:
        with _lock, contextlib.suppress(ValueError):
            _listeners.remove(callback)

    return remove


def _announce(tmp: Path, final: Path) -> None:
    with _lock:
        listeners = list(_listeners)
    for callback in listeners:
        callback(tmp, final)


def final_path_of(path: str | os.PathLike) -> Path | None:
    """The final path an active temporary output will be renamed to; None if `path` is not one."""
    with _lock:
        return _active.get(path_key(Path(path)))


def active_temporaries() -> list[Path]:
    """The temporary outputs being written in this process now."""
    with _lock:
        return [Path(k) for k in _active]


def _remove(path: Path) -> None:
    # Best effort: on a file system that turned read-only even a missing file's unlink fails (EROFS),
    # and the error being handled is the one to report.
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _free_bytes(folder: Path) -> int | None:
    """Free bytes the writing process may still use on `folder`'s file system (root may use the
    blocks reserved for it on ext4), or None where it cannot be asked."""
    try:
        if hasattr(os, "statvfs"):
            st = os.statvfs(folder)
            blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
            return blocks * st.f_frsize
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def ensure_free_space(path: str | os.PathLike, nbytes: int) -> None:
    """OutputWriteError naming `path` when its file system has less than `nbytes` free now."""
    final = Path(path)
    folder = final.absolute().parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    free = _free_bytes(folder)
    if free is not None and free < nbytes:
        raise OutputWriteError(f"no space left on device for {final}: it needs about {nbytes / 2**20:.1f} MiB, "
                               f"{free / 2**20:.1f} MiB are free")


def _is_no_space(exc: BaseException) -> bool:
    """ENOSPC (or a quota) anywhere in the exception chain; libraries that wrap it keep the C text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        text = str(exc)
        if "No space left on device" in text or "errno = 28" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _fsync(path: Path) -> None:
    if path.is_dir():
        return
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _retarget(exc: BaseException, tmp: Path, final: Path) -> BaseException | None:
    """The same failure naming the user's path instead of the hidden temporary one (None: keep exc)."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    # A full disk also when the writer's message does not say so (ITK's NRRD: "fwrite wrote only ...").
    if _is_no_space(exc) or _free_bytes(final.parent) == 0:
        if isinstance(exc, OutputWriteError) and str(exc).startswith("no space left"):
            return None
        return OutputWriteError(f"no space left on device writing {final}")
    if isinstance(exc, OutputWriteError):
        return None
    if isinstance(exc, OSError) and exc.filename is not None and path_key(Path(exc.filename)) == path_key(tmp):
        if exc.errno == errno.EROFS:
            return OutputWriteError(f"cannot write {final}: the file system is read-only")
        return type(exc)(exc.errno, exc.strerror, os.fspath(final))
    text = str(exc)
    if os.fspath(tmp) not in text and tmp.name not in text:
        return None
    text = text.replace(os.fspath(tmp), os.fspath(final)).replace(tmp.name, final.name)
    try:
        return type(exc)(text)
    except Exception:  # noqa: BLE001 - an exception type that needs other arguments keeps its message
        return None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; renamed to `path` on success, removed on any error.

    Inside another `atomic_output` for the same file (`path` is the outer temporary) this yields
    `path` itself and leaves renaming and clean-up to the outer one.
    """
    final = Path(path)
    if final_path_of(final) is not None:
        yield final
        return
    if final.parent and not final.parent.exists():
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputWriteError(f"cannot create the folder of {final}: {exc.strerror or exc}") from exc
    tmp = _temporary_sibling(final)
    with _lock:
        _active[path_key(tmp)] = final
    try:
        _announce(tmp, final)
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"writer did not create {final}")
        _fsync(tmp)
        free = _free_bytes(tmp.parent)
        if free is not None and free == 0:
            # A writer that only printed its short write (VTK, ITK's NIfTI) left a truncated file.
            raise OutputWriteError(f"no space left on device writing {final}")
        os.replace(tmp, final)
    except BaseException as exc:
        replacement = _retarget(exc, tmp, final)  # before removing tmp: a full disk is still full
        _remove(tmp)
        if replacement is not None:
            raise replacement from exc
        raise
    finally:
        with _lock:
            _active.pop(path_key(tmp), None)


@contextlib.contextmanager
def scratch_folder(beside: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to `beside` (same file system), announced like a temporary output and
    always removed at the end; for writers that must produce several files before renaming one."""
    final = Path(beside)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = final.with_name(f".{final.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}.scratch")
    with _lock:
        _active[path_key(folder)] = final
    try:
        _announce(folder, final)
        folder.mkdir()
        yield folder
    except BaseException as exc:
        replacement = _retarget(exc, folder, final)
        if replacement is not None:
            raise replacement from exc
        raise
    finally:
        _remove(folder)
        with _lock:
            _active.pop(path_key(folder), None)


def remove_active_temporaries() -> None:
    """Remove every temporary output of this process (a last resort on termination)."""
    for tmp in active_temporaries():
        _remove(tmp)


def is_partial(path: str | os.PathLike) -> bool:
    """True for a temporary file made by `atomic_output` (tests look for leftovers with this)."""
    return PARTIAL_MARK in Path(path).name


def _extension_of(path: Path, extensions: Iterable[str]) -> str | None:
    name = path.name.lower()
    matches = [e for e in extensions if name.endswith(e.lower())]
    return max(matches, key=len) if matches else None


def check_output_path(path: str | os.PathLike, *, what: str = "output",
                      extensions: Iterable[str] | None = None) -> Path:
    """Check an output path before any work starts; InputError naming `what` and the path.

    The extension must be one of `extensions` (when given); the path must not be a folder; its folder
    must exist or be creatable (the nearest existing ancestor is a folder), and be writable (a
    read-only file system or a missing permission is refused here, not after an hour of work).
    """
    p = Path(path).expanduser()
    if extensions is not None:
        exts = list(extensions)
        if _extension_of(p, exts) is None:
            raise InputError(f"{what} {p}: unsupported extension; expected one of {', '.join(exts)}")
    if p.is_dir():
        raise InputError(f"{what} {p}: is an existing folder; expected a file path")
    folder = p.absolute().parent
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} {p}: {existing} is not a folder, so the output folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except (AttributeError, OSError):
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        raise InputError(f"{what} {p}: the folder {existing} {why}")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{what} {p}: the existing file cannot be replaced (permission denied)")
    return p
