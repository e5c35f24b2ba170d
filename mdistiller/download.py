"""Fetching files over HTTP(S) for the data sets and the published teachers: resumable, time-limited, locked.

Foundation code (imports nothing of the package but errors.py). Only the standard library's urllib and tqdm's bar:
- `fetch` streams a URL into `<dest>.part` and renames it to `dest` when complete; a `.part` left by an interrupted
  run is resumed with an HTTP Range request (a server that ignores Range sends the whole file, which restarts it).
- every socket operation, and the host-name lookup, is bounded by a timeout, so an offline machine fails in seconds
  with one line instead of hanging;
- `file_lock` serialises processes on one machine (torchrun ranks, a sweep's runs) with an fcntl lock, so that one
  downloads while the others wait and then find the files in place; the lock file (holding `<pid>@<host>`) and the
  folders it created are removed on every way out (error, Ctrl-C, SIGTERM), and a lock left by a killed process is
  taken over with a note;
- `extract_tar` unpacks the regular files of a tar archive (never a path outside the target folder), and
  `check_tar_complete` tells a truncated archive from a whole one.

The environment variable MDISTILLER_OFFLINE (set to anything but "" or "0") refuses every network download at once:
for machines without internet, and for the test suite, which must never reach the network.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Iterable, Iterator

from tqdm import tqdm

from .errors import MdistillerError

try:
    import fcntl
except ImportError:  # not POSIX: downloads still work, concurrent ones are not serialised
    fcntl = None

OFFLINE_ENV = "MDISTILLER_OFFLINE"
TIMEOUT_S = 20.0  # per socket operation (connect, each read) and for the host-name lookup
CHUNK = 1 << 20
USER_AGENT = "mdistiller (python urllib)"
NETWORK_SCHEMES = ("http", "https", "ftp")


def offline() -> bool:
    """Whether MDISTILLER_OFFLINE forbids network downloads."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def local_path(url_or_path: str) -> str | None:
    """The file a `file://` URL or a plain path names; None for a network URL."""
    parsed = urllib.parse.urlparse(url_or_path)
    if parsed.scheme == "file":
        return urllib.request.url2pathname(parsed.path)
    if parsed.scheme in NETWORK_SCHEMES:
        return None
    return url_or_path  # a plain path (a one-letter "scheme" is a Windows drive)


def is_local_main() -> bool:
    """The process that prints on this machine: LOCAL_RANK 0 under torchrun, or any process without it."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def megabytes(n: int | None) -> str:
    """A byte count for messages."""
    return "unknown size" if n is None else f"{n / 1e6:.1f} MB"


LOCK_POLL_S = 0.5
LOCK_WAIT_S = 6 * 3600.0  # the longest a process waits for a live holder before it gives up with one line


def _holder(path: str) -> tuple[int, str] | None:
    """(pid, host) written in a lock file by the process that holds (or held) it; None when unreadable or empty."""
    try:
        with open(path) as f:
            pid, _, host = f.read().strip().partition("@")
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def created_folders(folder: str) -> list[str]:
    """The folders `os.makedirs(folder)` would create, deepest first (empty when `folder` exists)."""
    made = []
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        made.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return made


def remove_empty(folders: Iterable[str]) -> None:
    """Remove each folder that is empty, deepest first (folders a failed step created; anything kept stays)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


class _Terminated(BaseException):
    """SIGTERM while a lock is held: unwinds like Ctrl-C so the lock file is removed, then exits with 143."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a lock is held, SIGTERM raises (so `finally` blocks run) instead of killing the process outright; only
    where nothing else handles SIGTERM and only in the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def raise_terminated(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    except _Terminated:
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def file_lock(path: str, waiting: str | None = None, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created with its folders if needed); `waiting` is printed once if another
    process has it.

    The lock file holds `<pid>@<host>` of its holder and is removed on every way out (an error, Ctrl-C, SIGTERM), as
    are the folders it created when they are left empty. A lock file left by a killed process is taken over with a
    note: on POSIX the fcntl lock went with the process; elsewhere (and for a lock that names a dead process on this
    host) the pid is checked. A live holder is waited for at most `timeout` seconds (LOCK_WAIT_S), then one line
    names it.
    """
    made = created_folders(os.path.dirname(os.path.abspath(path)))
    host = socket.gethostname()
    limit = LOCK_WAIT_S if timeout is None else timeout
    try:
        with _sigterm_unwinds():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            handle = _acquire(path, waiting, host, limit)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.remove(path)  # while still locked: a process waiting on this file then finds it gone
                handle.close()  # releases the fcntl lock
    finally:
        remove_empty(made)


def _acquire(path: str, waiting: str | None, host: str, limit: float):
    """Open and lock `path` (retrying when the file it locked was removed by its previous holder meanwhile); the
    open handle, with this process's `<pid>@<host>` written in it."""
    deadline = time.monotonic() + limit
    announced = False
    while True:
        previous = _holder(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # a previous holder may have removed it
        handle = open(path, "a+")
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                except BlockingIOError:
                    locked = False
            else:  # no fcntl: the pid in the file is the lock
                locked = previous is None or (previous[1] == host and not _alive(previous[0]))
            if locked and _same_file(handle, path):
                previous = _holder(path)
                if previous is not None and previous != (os.getpid(), host) and is_local_main():
                    alive = "" if previous[1] != host else " (no longer running)"
                    print(f"note: taking over the lock {path} left by process {previous[0]} on {previous[1]}{alive}",
                          file=sys.stderr, flush=True)
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}@{host}")
                handle.flush()
                return handle
        except BaseException:
            handle.close()
            raise
        handle.close()
        if not locked:
            holder = _holder(path)
            if not announced and waiting and is_local_main():
                print(waiting, file=sys.stderr, flush=True)
                announced = True
            if time.monotonic() > deadline:
                who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
                raise MdistillerError(f"gave up waiting for the lock {path} after {limit:g} s: {who} holds it; "
                                      f"if nothing is running, delete the file")
            time.sleep(LOCK_POLL_S)


def _same_file(handle, path: str) -> bool:
    """Whether the open handle is still the file at `path` (its previous holder may have removed it meanwhile)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def _resolve_host(url: str, timeout: float) -> None:
    """Look the host up in a daemon thread: getaddrinfo ignores socket timeouts and can block for long offline (a
    daemon thread, unlike an executor's, never delays the interpreter's exit)."""
    parsed = urllib.parse.urlparse(url)
    if not parsed.hostname:
        return
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(parsed.hostname, parsed.port or 443)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=lookup, name="mdistiller-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise OSError(f"no answer for {parsed.hostname} within {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]


def _reason(exc: BaseException) -> str:
    """A short, one-line cause of a network error."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else OSError(str(exc.reason))
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:160]


def _open(url: str, start: int, timeout: float):
    """Open `url` from byte `start`: (response, resumed, total size or None)."""
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # nothing left past `start`: the part file is whole (or too long)
            total = exc.headers.get("Content-Range", "").rpartition("/")[2]
            exc.close()
            if total.isdigit() and int(total) == start:
                return None, True, start
            raise OSError("the partial file is longer than the file on the server") from None
        raise
    length = response.headers.get("Content-Length")
    if start and response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return response, True, int(total) if total.isdigit() else (start + int(length) if length else None)
    return response, False, int(length) if length and length.isdigit() else None


def fetch(url: str, dest: str, what: str, timeout: float = TIMEOUT_S, progress: bool = True) -> str:
    """Download `url` to `dest` (resuming `dest`.part if present) and return dest.

    Errors are one-line MdistillerErrors that start with "downloading <what> from <url> failed"; the partial file is
    kept so that the next call resumes it.
    """
    if offline() and local_path(url) is None:
        raise MdistillerError(f"downloading {what} from {url} failed ({OFFLINE_ENV} is set: no network downloads)")
    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    start = os.path.getsize(part) if os.path.isfile(part) else 0
    done = start
    try:
        _resolve_host(url, timeout)
        response, resumed, total = _open(url, start, timeout)
        if response is None:  # the part file already holds everything
            os.replace(part, dest)
            return dest
        with response:
            if not resumed:
                start = done = 0
            if total is not None and shutil.disk_usage(os.path.dirname(os.path.abspath(dest))).free < total - done:
                raise MdistillerError(
                    f"not enough disk space for {what} in {os.path.dirname(os.path.abspath(dest))}: "
                    f"{megabytes(total - done)} needed"
                )
            # One process downloads at a time (file_lock), so this line and the bar come from one process only.
            verb = f"resuming at {megabytes(start)} of" if resumed else "downloading"
            print(f"{verb} {what} ({megabytes(total)}) from {url}", file=sys.stderr, flush=True)
            bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                       file=sys.stderr, disable=None if progress else True)  # None: a bar on a terminal only
            with bar, open(part, "ab" if resumed else "wb") as out:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
    except MdistillerError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        # URLError/HTTPError, timeouts, refused or reset connections, IncompleteRead, a full disk
        kept = f"; {megabytes(done)} kept in {part}, run again to resume" if done else ""
        raise MdistillerError(f"downloading {what} from {url} failed ({_reason(exc)}){kept}") from None
    if total is not None and done != total:
        raise MdistillerError(
            f"downloading {what} from {url} failed (interrupted at {megabytes(done)} of {megabytes(total)}); "
            f"the part is kept in {part}, run again to resume"
        )
    os.replace(part, dest)
    return dest


def check_tar_complete(archive: str, what: str) -> list[tarfile.TarInfo]:
    """The members of a tar archive, or a one-line error if it is unreadable or truncated.

    tarfile stops silently at a cut that falls between two members, so the end-of-archive marker (a zero block
    after the last member) is checked too.
    """
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MdistillerError(f"{what} {archive} is truncated or not a tar archive ({_reason(exc)})") from None
    if not archive.endswith(("gz", "bz2", "xz")):  # the marker check reads raw bytes: plain tar files only
        with open(archive, "rb") as f:
            f.seek(end)
            marker = f.read(tarfile.BLOCKSIZE)
        if len(marker) < tarfile.BLOCKSIZE or marker.count(0) != tarfile.BLOCKSIZE:
            last = members[-1].name if members else "its start"
            raise MdistillerError(f"{what} {archive} is truncated (it ends after {last}, without tar's end marker)")
    return members


def _safe_relative(name: str) -> str | None:
    """A member name as a relative path inside the target folder, or None for absolute or '..' names."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts or name.startswith("/"):
        return None
    return os.path.join(*parts)


def extract_tar(archive: str, folder: str, what: str, names: Iterable[str] | None = None) -> list[str]:
    """Write the regular files of `archive` (those in `names`, if given) under `folder`; the relative paths written.

    Links, devices and names that would land outside `folder` are skipped. A read error (a truncated or damaged
    archive) is a one-line MdistillerError; the caller extracts into a temporary folder and removes it then.
    """
    wanted = set(names) if names is not None else None
    written = []
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                relative = _safe_relative(member.name)
                if not member.isfile() or relative is None or (wanted is not None and member.name not in wanted):
                    continue
                target = os.path.join(folder, relative)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                source = tar.extractfile(member)
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
                written.append(relative)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise MdistillerError(f"{what} {archive} is truncated or damaged ({_reason(exc)})") from None
    return written

