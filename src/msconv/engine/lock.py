"""One writer per run folder: ``<run>/.lock``, held with ``flock`` while a training run writes the folder.

A second process that would write the same folder (the same command started twice, ``--resume auto`` while the
run is still going, another user) meets ``RunFolderBusy``, one line naming the folder and the holder (process id,
host, start time, written into the lock file by the holder). The kernel releases an ``flock`` when its holder's
last file descriptor closes, so a process that dies, SIGKILL included, leaves no lock behind: the file stays (it
is never removed: removing a lock file while another process waits on it would let two holders in) but is free.
DataLoader workers forked while the lock is held do not keep it: the forked copy of the descriptor is closed in
the child.

Network file systems: on Linux NFS (v3 with the NLM lock service, v4 natively) ``flock`` is carried out as a POSIX
lock on the server, so two machines sharing the folder exclude each other, and the server frees the lock of a
client that crashed (NFSv4 after its lease, about 90 s). A mount with ``nolock`` or ``local_lock=flock|all`` keeps
locks on each machine only: then the lock guards against a second run on the same machine but not on another one,
and the holder line in ``.lock`` is the only trace. A file system without locks at all (``ENOLCK``) is refused
with a message; ``MSCONV_NO_LOCK=1`` runs without the lock.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path
from typing import Optional, Set, Union

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go without the lock
    fcntl = None

__all__ = ['RunLock', 'RunFolderBusy', 'LOCK_NAME']

LOCK_NAME = '.lock'
_HELD: Set[int] = set()  # descriptors of the locks this process holds (closed in forked children)


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_close_in_child)


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock (the message names the folder and the holder)."""


class RunLock:
    """The lock of ``run_dir`` (see the module docstring): ``acquire()`` or ``RunFolderBusy``; ``release()``."""

    def __init__(self, run_dir: Union[str, os.PathLike]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        if self.fd is not None or fcntl is None or os.environ.get('MSCONV_NO_LOCK') == '1':
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only, full or vanished file system
            raise OSError(
                f"run folder {str(self.run_dir)!r} cannot be written: opening its lock file {str(self.path)!r} "
                f"failed ({e.strerror or e})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(
                    f"run folder {str(self.run_dir)!r} is being written by another process "
                    f"({holder or 'holder unknown'}); one run folder has one writer: wait for it to end or stop it, "
                    f"or pass --name NAME for a new run"
                ) from None
            raise OSError(
                f"run folder {str(self.run_dir)!r}: cannot lock {str(self.path)!r} ({e.strerror}); the file system "
                f"has no locks (an NFS mount with 'nolock'?): mount it with locks, or set MSCONV_NO_LOCK=1 to run "
                f"without the lock (make sure no other process writes the folder)"
            ) from None
        self.fd = fd
        _HELD.add(fd)
        line = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, line.encode(), 0)
        except OSError:  # the holder line is for messages only; the lock is what counts
            pass

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD.discard(self.fd)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> 'RunLock':
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode(errors='replace').strip()
    except OSError:
        return ''
