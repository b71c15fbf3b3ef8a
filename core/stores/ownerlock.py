"""One engine per store file: an exclusive lock on a file beside it, held while the engine runs.

Two engines executing the runs of one SQLite file would both resume the same
unfinished runs, and execute their nodes twice. The engine that owns the
store's runs (``open_engine(resume=True)``, which ``trioflow serve`` uses)
takes an exclusive ``flock`` on ``<file>.lock`` for as long as it runs, and
writes who it is into that file; another one is refused with a
:class:`~trioflow.errors.StoreLockedError` naming the holder. The operating
system drops the lock when the holder's process ends, however it ends
(``kill -9`` included), so it never goes stale.

Tools that only read a store, or change only finished runs (``trioflow
prune``), take no lock and may run beside a server.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

from ..errors import StoreLockedError


class OwnerLock:
    """The lock of one store file. Blocking calls: use from a worker thread."""

    def __init__(self, store_path: str) -> None:
        self.store_path = store_path
        self.path = store_path + ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise naming the process that holds it.

        Raises:
            StoreLockedError: another process (or another engine of this one) holds it.
        """
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StoreLockedError(self.store_path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "command": " ".join(
                os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)
            )[:200],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the lock


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        holder = {}
    return holder if isinstance(holder, dict) else {}
