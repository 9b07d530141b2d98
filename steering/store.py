"""The vector store: a directory of named steering vectors for one model, shared by every process that writes
it (servers, the CLI), with atomic exclusive writes, every vector checked against the model on entry.

Each vector is one ``<name>.safetensors`` file (tensors ``layer.<i>`` plus JSON metadata). The directory is the
truth; the store's in-memory copies follow it:

- A name is looked up on disk on every use (one ``stat``): a file written by another process is read on first
  use (re-scan on miss), a replaced file is read again, a deleted one disappears. Listings and :meth:`reload`
  scan the whole directory; :meth:`watch` does so periodically. Every file read is checked against the model as
  an upload is; files that do not fit are refused (:attr:`skipped` says why) and are not usable.
- Writes go to a temporary file that is fsynced, then moved to the final name under a lock every process takes
  (``flock`` on the directory): with ``os.link`` (an exclusive create: it fails when the name exists) unless
  overwriting was asked for, then with a rename over it. A killed process leaves the previous file or the new
  one, never a half-written one, and a file the store did not know about is never replaced without
  ``overwrite``.
- Whoever changes what a name means (a write, a delete, or a change found on disk) notifies the store's
  listeners (:meth:`subscribe`), so a backend that keeps copies of vectors drops them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from steering.engine.types import ModelIdentity
from steering.errors import ConflictError, NotFoundError, SteeringError, SteeringValidationError
from steering.vectors import SteeringVector

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: writers of one process are still serialised
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_VECTOR_DIR = Path.home() / ".local" / "share" / "steerserve" / "vectors"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A whole name (matched with fullmatch, so no trailing newline slips through)."""
SUFFIX = ".safetensors"
STALE_TMP_SECONDS = 600
"""Temporary files of interrupted writes older than this are removed when the store loads."""
LOCK_FILE = ".steerserve.lock"
"""Where a directory cannot be locked itself, the lock file writers take while they move a file into place."""


class VectorNotFoundError(NotFoundError):
    """No vector of that name is registered."""


class VectorRefusedError(VectorNotFoundError):
    """A file of that name is in the directory, but it is not usable here (built for another model...)."""


class ModelMismatchError(SteeringValidationError):
    """The vector was built for a different model."""


class VectorExistsError(ConflictError):
    """A vector of that name already exists (and overwrite was not asked for)."""


class VectorDirError(SteeringError):
    """The store's directory cannot be created or written (a read-only volume, a file in its place, no
    permission): a server must not start on it, since every upload and build would fail."""


def check_writable(root: str | os.PathLike) -> Path:
    """Create ``root`` if needed and prove it can be written (a temporary file is created and removed there);
    raise :class:`VectorDirError` saying why not."""
    path = Path(root).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".steerserve-write-check.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise VectorDirError(f"the vector directory {path} cannot be written ({exc.strerror or exc}); give the "
                             "server a writable --vector-dir (STEERSERVE_VECTOR_DIR)") from exc
    return path


RESERVED = frozenset({"build", "reload"})
"""Names that are paths of the vector API (``/v1/steering/vectors/build``, ``.../reload``), not vectors."""


def check_name(name: str) -> str:
    if isinstance(name, str) and name in RESERVED:
        raise SteeringValidationError(f"{name!r} is reserved (it is an endpoint); choose another name", param="name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SteeringValidationError(
            "a vector name is 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
            param="name",
        )
    return name


def _valid(name: str) -> bool:
    return isinstance(name, str) and name not in RESERVED and NAME_RE.fullmatch(name) is not None


_Sig = tuple[int, int, int]
"""What identifies one version of a file: (inode, size, mtime in ns). A rename into place brings a new inode;
a rewrite in place a new mtime."""


def _sig(st: os.stat_result) -> _Sig:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _stat(path: Path) -> _Sig | None:
    try:
        return _sig(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # a dangling symlink loop, permissions...: the file is there but cannot be read
        log.debug("cannot stat %s: %s", path, exc)
        return (-1, -1, -1)


@dataclass
class _Entry:
    vector: SteeringVector
    norms: dict[int, float]
    sig: _Sig


@dataclass
class Refused:
    """A file in the directory that is not usable here, and why."""

    file: str
    reason: str
    name: str | None = None
    """The vector's name, when the file's name is a valid one."""


@dataclass
class ScanReport:
    """What a scan of the directory found changed since the store last looked."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    """Every file that is not usable (not only the ones found this time)."""
    total: int = 0
    """Usable vectors after the scan."""

    @property
    def names(self) -> list[str]:
        return sorted({*self.added, *self.removed, *self.changed})


class VectorStore:
    def __init__(self, root: str | os.PathLike, model: ModelIdentity | None) -> None:
        """``model`` None: no model is loaded (CLI housekeeping); vectors are then checked only for shape."""
        self.root = Path(root)
        self.model = model
        self._entries: dict[str, _Entry] = {}
        self._refused: dict[str, tuple[_Sig, Refused]] = {}  # file name -> (the version refused, why)
        self._lock = threading.RLock()
        self._listeners: list[Callable[[str], None]] = []

    # -- listeners
    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(name)`` after a vector is stored, overwritten, deleted or renamed (with each name
        involved), or found added, changed or removed on disk, e.g. for a backend that keeps copies of vectors;
        returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _changed(self, *names: str) -> None:
        for listener in list(self._listeners):
            for name in names:
                try:
                    listener(name)
                except Exception:  # a listener must not undo a write that has happened
                    log.exception("vector store listener failed for %r", name)

    # -- checks
    def _check(self, vec: SteeringVector) -> None:
        if self.model is None:
            vec.validate(vec.hidden_size if vec.values else 0, max(vec.values, default=0) + 1)
            return
        built_for = vec.metadata.get("model")
        if isinstance(built_for, dict):
            diff = self.model.mismatches(built_for)
            if diff:
                raise ModelMismatchError(
                    f"vector was built for another model: {', '.join(diff)}; build it again for "
                    f"{self.model.name!r} or remove its 'model' metadata if you know it fits", param="model")
        vec.validate(self.model.hidden_size, self.model.num_layers)

    # -- following the directory
    def _path(self, name: str) -> Path:
        return self.root / f"{name}{SUFFIX}"

    def _read(self, file: str, sig: _Sig) -> tuple[SteeringVector | None, str | None, _Sig | None]:
        """Read and check one file: (vector, None, its version) or (None, why not, version); version None when
        the file went away. A file that changes while it is read is read again."""
        path = self.root / file
        name = file[: -len(SUFFIX)]
        vec: SteeringVector | None = None
        why: str | None = None
        for _ in range(3):
            try:
                check_name(name)
                if path.is_symlink() and not path.resolve().is_relative_to(self.root.resolve()):
                    raise SteeringValidationError(f"{file} is a symlink out of the vector directory")
                if not stat.S_ISREG(os.stat(path).st_mode):
                    raise SteeringValidationError(f"{file} is not a regular file")
                loaded = SteeringVector.load(path)
                loaded.name = name
                self._check(loaded)
                vec, why = loaded, None
            except FileNotFoundError:
                return None, None, None
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the server
                vec, why = None, str(exc) or type(exc).__name__
            after = _stat(path)
            if after == sig or after is None:
                return vec, why, after
            sig = after  # replaced while we read it: read the new one
        return vec, why, sig

    def _sync_file(self, file: str, sig: _Sig | None, report: ScanReport) -> None:
        """Bring what the store holds for ``file`` in line with its version ``sig`` on disk (None: gone)."""
        name = file[: -len(SUFFIX)]
        entry = self._entries.get(name)
        held = self._refused.get(file)
        if sig is not None and ((entry is not None and entry.sig == sig) or (held is not None and held[0] == sig)):
            return
        vec, why, sig = self._read(file, sig) if sig is not None else (None, None, None)
        self._refused.pop(file, None)
        if vec is not None and sig is not None:
            self._entries[name] = _Entry(vec, _norms(vec), sig)
            (report.changed if entry is not None else report.added).append(name)
            return
        if entry is not None:
            del self._entries[name]
            report.removed.append(name)
        if why is not None and sig is not None:
            self._refused[file] = (sig, Refused(file, why, name if _valid(name) else None))
            log.warning("steering vector file %s is not usable: %s", self.root / file, why)

    def _sync(self, name: str, report: ScanReport) -> None:
        if _valid(name):
            self._sync_file(f"{name}{SUFFIX}", _stat(self._path(name)), report)

    def _scan(self) -> ScanReport:
        report = ScanReport()
        found: dict[str, _Sig | None] = {}
        try:
            with os.scandir(self.root) as it:
                for item in it:
                    if item.name.endswith(SUFFIX):
                        found[item.name] = _stat(Path(item.path))
        except FileNotFoundError:
            pass  # no directory: no vectors
        except OSError as exc:
            log.warning("cannot scan the vector directory %s: %s", self.root, exc)
            return self._finish(report)
        for file in sorted({*found, *(f"{n}{SUFFIX}" for n in self._entries), *self._refused}):
            self._sync_file(file, found.get(file), report)
        return self._finish(report)

    def _finish(self, report: ScanReport) -> ScanReport:
        report.refused = [r for _, r in sorted(self._refused.values(), key=lambda x: x[1].file)]
        report.total = len(self._entries)
        return report

    def _synced(self, name: str) -> _Entry | None:
        """The entry for ``name`` as the file is now (listeners told of any change)."""
        report = ScanReport()
        with self._lock:
            self._sync(name, report)
            entry = self._entries.get(name)
        if report.names:
            self._changed(*report.names)
        return entry

    def refresh(self) -> ScanReport:
        """Scan the directory: read new and changed files, drop deleted ones; tell listeners what changed."""
        with self._lock:
            report = self._scan()
        if report.names:
            self._changed(*report.names)
        return report

    def reload(self) -> ScanReport:
        """:meth:`refresh`, after removing stale temporary files of interrupted writes (creates the directory)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        return self.refresh()

    def load_all(self) -> int:
        """(Re)load every vector file in the directory; return how many are usable. Files that are symlinks out
        of the directory are refused; stale temporary files of interrupted writes are removed."""
        return self.reload().total

    def watch(self, interval: float = 2.0) -> Callable[[], None]:
        """Re-scan every ``interval`` seconds on a daemon thread (so backends hear of files removed on disk even
        when nobody asks); returns the function that stops it."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - keep watching
                    log.exception("re-scanning the vector directory %s failed", self.root)

        threading.Thread(target=run, name="steerserve-vector-watch", daemon=True).start()
        return stop.set

    @property
    def skipped(self) -> dict[str, str]:
        """File name -> why it is not usable (as of the last scan or look-up)."""
        with self._lock:
            return {file: r.reason for file, (_, r) in sorted(self._refused.items())}

    def refused(self) -> list[Refused]:
        """The files that are not usable (as of the last scan or look-up)."""
        with self._lock:
            return self._finish(ScanReport()).refused

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        for tmp in self.root.glob(".*.tmp"):
            try:
                if tmp.is_file() and not tmp.is_symlink() and now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()
                    log.info("removed %s, left by an interrupted write", tmp)
            except OSError as exc:  # another process may be finishing it, or it is gone already
                log.debug("could not remove %s: %s", tmp, exc)

    # -- reading
    def norms(self, name: str) -> dict[int, float]:
        """Each layer's norm of a stored vector (computed once, when it was stored or read)."""
        return self.entry(name)[1]

    def entry(self, name: str) -> tuple[SteeringVector, dict[int, float]]:
        """The vector and its per-layer norms, as the file is now."""
        entry = self._synced(name)
        if entry is None:
            raise self._not_found(name)
        return entry.vector, entry.norms

    def entries(self) -> list[tuple[SteeringVector, dict[int, float]]]:
        """Every usable vector with its norms, by name, after a scan of the directory."""
        with self._lock:
            report = self._scan()
            out = [(e.vector, e.norms) for _, e in sorted(self._entries.items())]
        if report.names:
            self._changed(*report.names)
        return out

    def _not_found(self, name: str) -> VectorNotFoundError:
        with self._lock:
            held = self._refused.get(f"{name}{SUFFIX}") if _valid(name) else None
        if held is not None:
            return VectorRefusedError(f"steering vector {name!r} is not usable: {held[1].reason}", param="name")
        return VectorNotFoundError(f"steering vector {name!r} not found", param="name")

    def __len__(self) -> int:
        return self.refresh().total

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._synced(name) is not None

    def exists(self, name: str) -> bool:
        """Whether a file of that name is in the directory, usable or not."""
        return _valid(name) and _stat(self._path(name)) is not None

    def names(self) -> list[str]:
        """The usable vectors' names, after a scan of the directory."""
        return [v.name or "" for v, _ in self.entries()]

    def get(self, name: str) -> SteeringVector:
        """The vector as its file is now: read again when the file changed, not found when it went away."""
        return self.entry(name)[0]

    # -- writing
    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """This process's lock, then the directory's (``flock`` on the directory itself, which every process that
        writes takes; a lock file where a directory cannot be locked, e.g. on NFS)."""
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            if fcntl is None:  # pragma: no cover
                yield
                return
            fd = os.open(self.root, os.O_RDONLY)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError:
                    os.close(fd)
                    fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def _exists_error(self, name: str, param: str, known: bool) -> VectorExistsError:
        where = "" if known else " (a file in the vector directory, written by another process or the CLI)"
        return VectorExistsError(f"steering vector {name!r} already exists{where}; set overwrite to replace it",
                                 param=param)

    def _fsync_dir(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _place(self, src: Path, dst: Path, name: str, param: str, overwrite: bool, known: bool) -> None:
        """Give ``src``'s file the name ``dst``: replacing whatever is there with ``overwrite``, else only when
        nothing is (exclusive, also against writers that do not take the lock file). ``src``'s name goes away."""
        if overwrite:
            os.replace(src, dst)
            return
        try:
            os.link(src, dst)
        except FileExistsError:
            raise self._exists_error(name, param, known) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                raise
            # no hard links here: the lock file keeps other steerserve writers out between the check and the move
            if os.path.lexists(dst):
                raise self._exists_error(name, param, known) from None
            os.replace(src, dst)
            return
        os.unlink(src)

    def put(self, name: str, vector: SteeringVector, overwrite: bool = False,
            expect: SteeringVector | None = None) -> SteeringVector:
        """Store a copy of ``vector`` under ``name`` (with its creation time and model recorded); return it.

        Without ``overwrite``, a name that is taken (by a vector the store knows, or by any file in the
        directory) is refused with :class:`VectorExistsError`. ``expect``: replace only the vector that
        :meth:`get` returned, refusing (ConflictError) when the file changed or went away meanwhile."""
        check_name(name)
        meta = dict(vector.metadata)
        meta.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if self.model is not None:
            meta.setdefault("model", self.model.as_dict())
        vector = replace(vector, name=name, metadata=meta)
        self._check(vector)
        norms = _norms(vector)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}{SUFFIX}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        tmp = Path(tmp_name)
        report = ScanReport()
        try:
            vector.save(tmp)  # written and fsynced under a temporary name, outside the locks
            sig = _stat(tmp)
            assert sig is not None
            with self._writing():
                known = name in self._entries
                self._sync(name, report)  # what the directory holds under that name now
                current = self._entries.get(name)
                if expect is not None and (current is None or current.vector is not expect):
                    raise ConflictError(f"steering vector {name!r} was changed or removed meanwhile; not replaced",
                                        param="name")
                if not overwrite and (current is not None or os.path.lexists(self._path(name))):
                    raise self._exists_error(name, "name", known)
                self._place(tmp, self._path(name), name, "name", overwrite, known)
                self._fsync_dir()
                self._entries[name] = _Entry(vector, norms, sig)
                self._refused.pop(f"{name}{SUFFIX}", None)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if report.names:
                self._changed(*report.names)
        self._changed(name)
        return vector

    def delete(self, name: str) -> None:
        """Remove the vector's file (also a file that is not usable here)."""
        report = ScanReport()
        try:
            with self._writing():
                self._sync(name, report)
                file = f"{name}{SUFFIX}"
                if name not in self._entries and file not in self._refused:
                    raise VectorNotFoundError(f"steering vector {name!r} not found", param="name")
                self._path(name).unlink(missing_ok=True)
                self._fsync_dir()
                self._refused.pop(file, None)
                if self._entries.pop(name, None) is not None:
                    report.removed.append(name)
        finally:
            if report.names:
                self._changed(*report.names)

    def rename(self, name: str, new_name: str, overwrite: bool = False) -> SteeringVector:
        """Rename atomically (one link or rename of the file); the vector keeps its values and metadata."""
        check_name(new_name)
        report = ScanReport()
        try:
            with self._writing():
                self._sync(name, report)
                entry = self._entries.get(name)
                if entry is None:
                    raise self._not_found(name)
                if new_name == name:
                    return entry.vector
                known = new_name in self._entries
                self._sync(new_name, report)
                taken = new_name in self._entries or os.path.lexists(self._path(new_name))
                if taken and not overwrite:
                    raise self._exists_error(new_name, "new_name", known)
                self._place(self._path(name), self._path(new_name), new_name, "new_name", overwrite, known)
                self._fsync_dir()
                del self._entries[name]
                vec = replace(entry.vector, name=new_name)
                sig = _stat(self._path(new_name))
                self._entries[new_name] = _Entry(vec, entry.norms, sig if sig is not None else entry.sig)
                self._refused.pop(f"{new_name}{SUFFIX}", None)
                report.changed += [name, new_name]
        finally:
            if report.names:
                self._changed(*report.names)
        return vec


def _norms(vec: SteeringVector) -> dict[int, float]:
    return {layer: float(v.norm()) for layer, v in sorted(vec.values.items())}
