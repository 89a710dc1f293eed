"""One run at a time per destination: a lease file that the run holding it keeps renewing.

Two runs writing one destination would each do all the work, and each one's start would clear the other's
temporary files, failing its writes. So a run claims the destination before it cleans or writes anything and
gives it back when it ends; a run that finds a live claim by another run stops at once, saying whose. A lease
is live while renewed: one left by a run that could not give it back (``kill -9``, a lost machine, a store that
refused the removal) lapses ``stale_after_s`` after its last renewal, or at once on the same machine when its
process is gone or its run has ended.

Object stores have no exclusive create through fsspec, so two runs starting within the same moment are told
apart by writing, waiting ``settle_s``, and reading back: the later write wins and the other run stops. On a
local disk claims are also made one at a time (a lock on the lease's folder, held from reading the lease to
writing it), so a run stalled between the two cannot overwrite a claim made meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from fsspec.implementations.local import LocalFileSystem

from .storage import Location, StorageError, read_bytes, remove, write_bytes

LEASE_NAME = "_manifest_parts/lease.json"
STALE_AFTER_S = 600.0
RENEW_EVERY_S = 60.0


class DestinationBusy(StorageError):
    """Another live run holds the destination."""


def _stamp(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")


# Holders of the leases this process holds now: a lease of this very process held by none of them was left by a
# run that ended without giving it back (its store refused the removal), and is as good as a dead process's.
_held_here: set[str] = set()
_held_lock = threading.Lock()


def _pid_namespace() -> int | None:
    """Which process-id space this process lives in: containers sharing a host name (host networking) do not
    share process ids."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _holder_gone(lease: dict) -> bool:
    """Whether the lease's run is known to have ended: only decidable on its own machine."""
    if (lease.get("host") != socket.gethostname() or lease.get("pid_namespace") != _pid_namespace()
            or not isinstance(lease.get("pid"), int)):
        return False
    if lease["pid"] == os.getpid():
        with _held_lock:
            return lease.get("holder") not in _held_here
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class DestinationLease:
    """``with DestinationLease(destination, holder):`` claims ``destination`` for the block (see the module's
    docstring). ``holder`` names the run (a Prefect flow run id, or a fresh id): a lease of the same holder is
    taken over, so a rerun of the same flow run is not locked out by its own crashed attempt."""

    def __init__(self, destination: Location, holder: str | None = None, stale_after_s: float = STALE_AFTER_S,
                 renew_every_s: float = RENEW_EVERY_S, settle_s: float | None = None):
        self.location = destination.child(LEASE_NAME)
        self.destination = destination
        self.holder = holder or uuid.uuid4().hex
        self.stale_after_s = stale_after_s
        self.renew_every_s = renew_every_s
        if settle_s is None:  # a local write is visible at once; an object store's write is a request away
            settle_s = 0.1 if isinstance(destination.filesystem()[0], LocalFileSystem) else 1.0
        self.settle_s = settle_s
        self.started_at = time.time()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> "DestinationLease":
        self.claim()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def read(self) -> dict | None:
        try:
            lease = json.loads(read_bytes(self.location))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign content: nobody can be holding it
            return None
        return lease if isinstance(lease, dict) else None

    def live(self, lease: dict) -> bool:
        renewed = lease.get("renewed_at_unix")
        if not isinstance(renewed, (int, float)) or _holder_gone(lease):
            return False
        return time.time() - renewed < self.stale_after_s

    def check_free(self) -> None:
        """Raise DestinationBusy where another run holds a live claim now; claims nothing (a quick look before
        starting work that would only stop at its claim)."""
        current = self.read()
        if current is not None and current.get("holder") != self.holder and self.live(current):
            raise self._busy(current)

    def claim(self) -> None:
        """Take the lease and keep it renewed, or raise DestinationBusy."""
        with _held_lock:  # from before its first write: a claim being made is not one this process left behind
            _held_here.add(self.holder)
        try:
            with self._claiming_alone():
                self.check_free()
                self._write()
            time.sleep(self.settle_s)
            current = self.read()
            if current is None or current.get("holder") != self.holder:
                raise self._busy(current)
        except BaseException:
            with _held_lock:
                _held_here.discard(self.holder)
            raise
        self._renewer = threading.Thread(target=self._renew, name="destination-lease", daemon=True)
        self._renewer.start()

    @contextlib.contextmanager
    def _claiming_alone(self):
        """On a local disk, an exclusive lock on the lease's folder for the block (the kernel drops it if the
        process dies; no file of its own is left behind); elsewhere nothing."""
        fs, path = self.location.filesystem()
        if not isinstance(fs, LocalFileSystem):
            yield
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still this run's. Never raises: with a failing store the
        run's own outcome matters more, and the lease lapses by itself."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        with _held_lock:
            _held_here.discard(self.holder)
        with contextlib.suppress(Exception):
            current = self.read()
            if current is not None and current.get("holder") == self.holder:
                remove(self.location)

    def _write(self) -> None:
        now = time.time()
        document = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                    "pid_namespace": _pid_namespace(),
                    "started_at": _stamp(self.started_at), "renewed_at": _stamp(now), "renewed_at_unix": now}
        write_bytes(self.location, (json.dumps(document) + "\n").encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                current = self.read()
                if current is not None and current.get("holder") != self.holder:
                    return  # lapsed while this process stood still, and taken over: never take it back
                self._write()
            except Exception:  # a store hiccup: the lease stays live for stale_after_s; the next renewal retries
                pass

    def _busy(self, lease: dict | None) -> DestinationBusy:
        if lease is None:  # ours vanished while we settled: another run took it over and gave it back
            return DestinationBusy(f"another run claimed {self.destination.display} at the same moment; run this "
                                   "one again when it has finished")
        renewed = lease.get("renewed_at_unix")
        seen = f"{time.time() - renewed:.0f} s ago" if isinstance(renewed, (int, float)) else "at an unknown time"
        return DestinationBusy(
            f"another run is writing to {self.destination.display} (run {lease.get('holder')} on "
            f"{lease.get('host')}, process {lease.get('pid')}, started {lease.get('started_at')}, last seen "
            f"{seen}); one run per destination at a time: wait for it to finish. If that run is gone, its claim "
            f"lapses {self.stale_after_s / 60:g} minutes after it was last seen (or delete {self.location.display})")
