"""Watching one shared folder: which paths changed, debounced and batched for the scanner.

Thread → loop adapter: owns one watchdog observer (its threads and its inotify instance); every
decision is taken on the asyncio event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from watchdog.events import (
    EVENT_TYPE_ATTRIB,
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from lanshare.errors import StorageError
from lanshare.paths import INTERNAL_DIR, TEMP_PREFIX

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import TracebackType

    from watchdog.observers.api import BaseObserver

logger = logging.getLogger(__name__)

# Theory of operation
# -------------------
# The watchdog observer runs in its own threads. Its event handler (``_Handoff``) does one thing:
# ``loop.call_soon_threadsafe`` with the event's kind, raw paths and directory flag. Everything
# else happens on the loop, against ``loop.time()``:
#
# * filter: the folder root itself, temporary files (``paths.TEMP_PREFIX``, in any component),
#   anything under ``.lanshare/``, the owner's ignore rules (a live object: the owner reloads
#   it when ``.lanshareignore`` changes, and the watcher sees the new rules at once),
#   "directory modified" (a directory whose entries changed: the entries report themselves),
#   and the owner's own writes: paths it announced (``expect_own_write``: one event each, or
#   expiry after a few seconds), and, announced or not, a move from a temporary name onto a
#   path (only lanshare makes temporary files: that is a download put in place) or from a
#   path into ``.lanshare/`` (a version archived), plus the one "closed after writing" event
#   of the descriptor that wrote a placed file, when nothing else touched the path in
#   between (the kernel names the file as it is called when the descriptor closes, after the
#   rename);
# * debounce per path: a path is ready once it has been quiet for ``debounce_interval`` (only
#   a tenth of it, ``SETTLE_FRACTION``, when its latest event ended a change: a file closed
#   after writing or renamed into place, attributes set; so an editor's save is taken at once,
#   a file still being written is not, and a stream of deletions is taken together), or
#   ``max_delay`` after its first
#   event even if it never goes quiet (a log file written continuously still gets synced, about
#   once per ``max_delay``). One loop timer, armed at the earliest deadline, collects every ready
#   path into one ``ChangeBatch``;
# * escalate (Syncthing's ``maxFiles``): when more than ``max_batch_paths`` distinct paths pend,
#   they are dropped for one full-rescan request, debounced the same way;
# * hand over: ready paths join one set the owner takes whole when it asks for the next batch,
#   so an owner busy scanning gets one batch of everything that changed meanwhile, not a queue
#   of batches. The set is bounded in paths: past ``max_batch_paths`` it becomes one full
#   rescan (nothing grows);
# * full rescans: one right at start (changes made while the daemon was down; unless the owner
#   scans the whole folder itself once the watches are set up), one every
#   ``rescan_interval`` as a safety net, one when the kernel's inotify queue overflowed (watchdog
#   only logs it: a process-wide logging handler turns that record into a request);
# * out of inotify watches (``ENOSPC``) or instances (``EMFILE``), at start or when a directory
#   is added later (watchdog 7 silently skips a sub-directory it cannot watch, so after a
#   directory appears a one-watch probe asks the kernel): one warning that says how to raise
#   the limit, then a full rescan every ``fallback_rescan_interval``.
#
# A full-rescan batch subsumes every path pending at that moment; events that arrive later pend
# anew, so nothing that changes after the scanner reads a file is lost.

DEFAULT_DEBOUNCE_INTERVAL: Final = 0.1
"""Seconds a path must stay quiet before it is reported (Syncthing waits 10 s)."""
SETTLE_FRACTION: Final = 0.1
"""Part of ``debounce_interval`` a path must stay quiet when its latest event ended a change
(closed after writing, renamed into place, attributes set): 0.01 s by default, long enough to
take the events of one save together; a longer debounce a user chose slows it alike."""
DEFAULT_MAX_DELAY: Final = 1.0
"""Seconds after its first event a path is reported even if it keeps changing."""
DEFAULT_MAX_BATCH_PATHS: Final = 512
"""More distinct pending paths than this become one full rescan (Syncthing's ``maxFiles``)."""
DEFAULT_RESCAN_INTERVAL: Final = 3600.0
"""Seconds between safety-net full rescans (Syncthing's ``rescanIntervalS`` with a watcher)."""
DEFAULT_FALLBACK_RESCAN_INTERVAL: Final = 60.0
"""Seconds between full rescans when inotify cannot watch the folder."""
DEFAULT_OWN_WRITE_TIMEOUT: Final = 5.0
"""Seconds an announced own write waits for its event before the announcement lapses."""

OVERFLOW_LOGGER: Final = "watchdog.observers.inotify_c"
"""The logger watchdog 7.1 reports a kernel inotify queue overflow on (``InotifyFD``)."""
OVERFLOW_MESSAGE: Final = "Inotify queue overflowed"
"""Start of that record's message; it is the only sign of lost events watchdog gives."""

_STOP_TIMEOUT = 10.0  # seconds to wait for the observer's threads; they end in milliseconds
_LIMIT_SYSCTL = {
    errno.ENOSPC: ("fs.inotify.max_user_watches", "inotify watches", 524288),
    errno.EMFILE: ("fs.inotify.max_user_instances", "inotify instances", 1024),
}
# Events worth a rescan. Leaving out "opened" and "closed without writing" keeps reads (peers
# fetching blocks) from waking the loop at all: watchdog builds the inotify mask from this list.
_EVENT_FILTER: Final[list[type[FileSystemEvent]]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    DirAttribEvent,
    FileClosedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
]
# The events that end a change: nothing more is on its way unless the path is written again.
# A file created or modified is still being written; its close comes when it is done.
# Deletions (a move out of the folder is one) keep the debounce: an ``rm`` of many files is
# a stream of them, and taken together they meet the mass-deletion guard as one.
_SETTLED_KINDS = frozenset({EVENT_TYPE_CLOSED, EVENT_TYPE_ATTRIB})
_CHANGE_KINDS = frozenset(
    {
        EVENT_TYPE_CREATED,
        EVENT_TYPE_MODIFIED,
        EVENT_TYPE_ATTRIB,
        EVENT_TYPE_CLOSED,
        EVENT_TYPE_DELETED,
        EVENT_TYPE_MOVED,
    }
)
# watchdog 7.1 warns (RuntimeWarning) when a directory created together with its parent
# (``mkdir -p``) is registered twice, by the parent's walk and by its own IN_CREATE, and then
# keeps the one callback it had: harmless. Under ``-W error`` the warning is raised in watchdog's
# inotify thread and ends it, and with it every later event; so it is silenced, narrowly.
_DOUBLE_WATCH_WARNING = r"Callback with id '\d+' already exists for watch"
_PRUNE_OWN_WRITES_AT = 1024  # announced own writes kept before expired ones are swept


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """What changed in a folder: some paths to rescan, or the whole folder."""

    folder_root: Path
    """The watched folder (absolute)."""
    paths: frozenset[str]
    """Paths relative to ``folder_root``, ``/``-separated, as named on disk (``os.fsdecode``,
    not NFC-normalised: the scanner validates them). Created, modified, deleted, and both ends
    of a move. A directory moved out of the folder is reported alone, not entry by entry: a
    path that no longer exists takes everything below it along. Empty when ``full_rescan``."""
    full_rescan: bool
    """Rescan the whole folder: at start, periodically, after lost events or too many changes."""


@dataclass(slots=True)
class WatcherStats:
    """Counters of one watcher, for status output and tests."""

    events: int = 0
    """Events the observer handed to the loop."""
    ignored: int = 0
    """Paths dropped: temporary, internal, ignored by rule, or not a content change."""
    own_writes: int = 0
    """Events swallowed as the owner's own writes: announced ones, files placed or archived,
    and a placed file's writer closing it."""
    path_batches: int = 0
    """Batches of paths taken by the owner."""
    full_rescans: int = 0
    """Full-rescan batches taken by the owner."""
    collapses: int = 0
    """Times more than ``max_batch_paths`` ready paths waited for the owner and became one
    full rescan."""
    inotify_overflows: int = 0
    """Kernel inotify queue overflows seen (events were lost)."""


class FolderWatcher:
    """Watches one folder and delivers :class:`ChangeBatch` es.

    Use as ``async with FolderWatcher(root) as watcher: async for batch in watcher: …``. Each
    batch holds every path that became ready since the previous one was taken (or is one full
    rescan). Every method runs on the event loop (call :meth:`expect_own_write` there, before
    the write starts).

    Args:
        root: the folder to watch (made absolute; symlinks are not resolved).
        debounce_interval: seconds a path must be quiet before it is reported (0.1).
        max_delay: seconds after its first event a path is reported regardless (1.0).
        max_batch_paths: more distinct pending (or ready, unread) paths than this become a full
            rescan (512).
        rescan_interval: seconds between safety-net full rescans (3600).
        fallback_rescan_interval: seconds between full rescans when inotify cannot watch (60).
        own_write_timeout: seconds an :meth:`expect_own_write` waits for its event (5).
        initial_rescan: deliver a full rescan at start; False when the owner scans the whole
            folder itself after :meth:`start` returned (the watches cover what changes later).
        ignore: ``ignore(rel, is_dir)`` is true for paths not to report, e.g.
            ``IgnoreRules.matches``; temporary files and ``.lanshare/`` are always left out.
        observer_factory: makes the watchdog observer (default: the platform's ``Observer``).
        watch_probe: ``watch_probe(directory)`` is false when the kernel has no inotify watch
            left (default :func:`inotify_watch_available`).

    Raises:
        ValueError: a non-positive interval or limit.
    """

    def __init__(
        self,
        root: Path,
        *,
        debounce_interval: float = DEFAULT_DEBOUNCE_INTERVAL,
        max_delay: float = DEFAULT_MAX_DELAY,
        max_batch_paths: int = DEFAULT_MAX_BATCH_PATHS,
        rescan_interval: float = DEFAULT_RESCAN_INTERVAL,
        fallback_rescan_interval: float = DEFAULT_FALLBACK_RESCAN_INTERVAL,
        own_write_timeout: float = DEFAULT_OWN_WRITE_TIMEOUT,
        initial_rescan: bool = True,
        ignore: Callable[[str, bool], bool] | None = None,
        observer_factory: Callable[[], BaseObserver] = Observer,
        watch_probe: Callable[[Path], bool] | None = None,
    ) -> None:
        for name, value in (
            ("debounce_interval", debounce_interval),
            ("max_delay", max_delay),
            ("rescan_interval", rescan_interval),
            ("fallback_rescan_interval", fallback_rescan_interval),
            ("own_write_timeout", own_write_timeout),
            ("max_batch_paths", max_batch_paths),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        self.root = Path(os.path.abspath(root))
        self.stats = WatcherStats()
        self._root_str = str(self.root)
        self._prefix = self._root_str.rstrip(os.sep) + os.sep
        self._debounce_interval = debounce_interval
        self._settle_interval = debounce_interval * SETTLE_FRACTION
        self._max_delay = max(max_delay, debounce_interval)
        self._max_batch_paths = max_batch_paths
        self._rescan_interval = rescan_interval
        self._fallback_rescan_interval = fallback_rescan_interval
        self._own_write_timeout = own_write_timeout
        self._initial_rescan = initial_rescan
        self._ignore = ignore
        self._observer_factory = observer_factory
        self._watch_probe = watch_probe if watch_probe is not None else inotify_watch_available

        self._state: Literal["new", "running", "stopped"] = "new"
        self._state_lock = threading.Lock()  # shared with the thread that starts the observer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: BaseObserver | None = None
        self._degraded_reason: str | None = None
        self._pending: dict[str, _Pending] = {}
        self._full_pending: _Pending | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_at = math.inf
        self._periodic_handle: asyncio.TimerHandle | None = None
        self._probe_due = False
        self._own_writes: dict[str, _OwnWrite] = {}
        self._placed: dict[str, float] = {}  # placed files whose writer's close is still due
        self._ready: dict[str, None] = {}  # paths ready for the owner, in order
        self._ready_full = False
        self._batch_ready = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start watching, then deliver the first full-rescan batch (unless not wanted).

        The watches are set up in a worker thread (one per directory: large trees take a
        while). Running out of inotify watches or instances is not an error: the watcher
        warns once and rescans periodically instead.

        Raises:
            StorageError: the folder cannot be watched (missing, not a directory, no access).
        """
        if self._state != "new":
            raise RuntimeError("a FolderWatcher starts only once")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._state = "running"
        warnings.filterwarnings("ignore", _DOUBLE_WATCH_WARNING, RuntimeWarning)
        _OVERFLOW_HOOK.register(self._overflow_from_thread)
        handoff = _Handoff(loop, self._on_event)
        try:
            failure = await asyncio.to_thread(self._start_observer, handoff)
        except BaseException:
            # Also on cancellation: the thread sees "stopped" and stops what it built.
            self._shut_down()
            raise
        if not self.running:  # stop() was called while the watches were being set up
            return
        if failure is not None:
            self._degrade(_limit_message(self.root, failure, self._fallback_rescan_interval))
        if self._initial_rescan:
            self._emit_full_rescan("start")
        self._arm_periodic()
        logger.debug("watching %s", self.root)

    async def stop(self) -> None:
        """Stop watching: observer threads stopped and joined, timers cancelled. Idempotent.

        What is ready stays; iterating the watcher ends once it was taken.
        """
        observer = self._shut_down()
        if observer is not None:
            await asyncio.to_thread(_stop_observer, observer)
        logger.debug("stopped watching %s", self.root)

    async def __aenter__(self) -> FolderWatcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __aiter__(self) -> FolderWatcher:
        return self

    async def __anext__(self) -> ChangeBatch:
        """The next batch; the iteration ends after :meth:`stop`, once nothing is ready."""
        while True:
            if self._ready_full or self._ready:
                batch = ChangeBatch(self.root, frozenset(self._ready), self._ready_full)
                self._ready.clear()
                self._ready_full = False
                if batch.full_rescan:
                    self.stats.full_rescans += 1
                else:
                    self.stats.path_batches += 1
                return batch
            if self._state == "stopped":
                raise StopAsyncIteration
            self._batch_ready.clear()
            await self._batch_ready.wait()

    # -- owner API -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._state == "running"

    @property
    def ready_paths(self) -> int:
        """Paths ready for the owner and not taken yet (0 while a full rescan waits)."""
        return len(self._ready)

    @property
    def degraded_reason(self) -> str | None:
        """Why changes are found only by periodic rescans (watch limit reached…), or None."""
        return self._degraded_reason

    def expect_own_write(self, rel: str) -> None:
        """Announce that lanshare itself is about to change ``rel``: its next event is not echoed.

        Call it before the write (e.g. before renaming a verified download into place). The
        announcement is used up by the first event on ``rel`` (as either end of a move, too) or
        lapses after ``own_write_timeout`` seconds, so a later real change is reported. Calling
        it twice expects two events.
        """
        now = self._now()
        own = self._own_writes.get(rel)
        if own is None or own.expires_at <= now:
            self._own_writes[rel] = _OwnWrite(1, now + self._own_write_timeout)
        else:
            own.count += 1
            own.expires_at = now + self._own_write_timeout
        if len(self._own_writes) > _PRUNE_OWN_WRITES_AT:
            self._prune_own_writes(now)

    def cancel_own_write(self, rel: str) -> None:
        """Withdraw one :meth:`expect_own_write` of ``rel`` (the write did not happen)."""
        own = self._own_writes.get(rel)
        if own is not None:
            own.count -= 1
            if own.count <= 0:
                del self._own_writes[rel]

    @contextlib.contextmanager
    def own_write(self, *rels: str) -> Iterator[None]:
        """``with watcher.own_write(rel): os.replace(tmp, dst)``: announce; withdraw on error."""
        for rel in rels:
            self.expect_own_write(rel)
        try:
            yield
        except BaseException:
            for rel in rels:
                self.cancel_own_write(rel)
            raise

    def rescan(self, reason: str = "requested") -> None:
        """Queue a full-rescan batch now (e.g. after the ignore rules changed)."""
        if self._state == "running":
            self._emit_full_rescan(reason)

    # -- thread side -----------------------------------------------------------------------

    def _start_observer(self, handoff: _Handoff) -> OSError | None:
        """In a worker thread: build and start the observer; a watch-limit error is returned."""
        try:
            observer = self._observer_factory()
        except OSError as exc:  # no inotify instance left (EMFILE)
            if exc.errno in _LIMIT_SYSCTL:
                return exc
            raise StorageError(f"cannot watch {self.root}: {exc}") from exc
        failure: OSError | None = None
        try:
            # Start first, then schedule: the watches are added (and may fail) right here.
            observer.start()
            observer.schedule(handoff, self._root_str, recursive=True, event_filter=_EVENT_FILTER)
        except OSError as exc:
            _stop_observer(observer)
            if exc.errno not in _LIMIT_SYSCTL:
                raise StorageError(f"cannot watch {self.root}: {exc.strerror or exc}") from exc
            failure = exc
        except BaseException:
            _stop_observer(observer)
            raise
        else:
            with self._state_lock:
                if self._state == "running":
                    self._observer = observer
                    return None
            _stop_observer(observer)  # the watcher was stopped or cancelled meanwhile
        return failure

    def _overflow_from_thread(self) -> None:
        """Called by the logging hook in whichever thread logged the overflow."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self._on_inotify_overflow)

    # -- loop side -------------------------------------------------------------------------

    def _on_event(self, kind: str, src: bytes | str, dest: bytes | str, is_dir: bool) -> None:
        if self._state != "running":
            return
        self.stats.events += 1
        if kind not in _CHANGE_KINDS or (kind == EVENT_TYPE_MODIFIED and is_dir):
            # A directory "modified" means its entries changed; they report themselves.
            self.stats.ignored += 1
            return
        now = self._now()
        src_path = os.fsdecode(src)
        if kind == EVENT_TYPE_DELETED and is_dir and src_path == self._root_str:
            self._degrade(
                f"{self.root} was deleted or moved away; rescanning it every "
                f"{self._fallback_rescan_interval:g} s"
            )
            self._emit_full_rescan("folder deleted")
            return
        if kind == EVENT_TYPE_MOVED:
            dest_path = os.fsdecode(dest)
            if self._placement(src_path, dest_path, now):
                return
            # Both ends of a move within the folder at once: a rename, not a deletion.
            self._note(src_path, is_dir, created=False, now=now, settled=True)
            self._note(dest_path, is_dir, created=True, now=now, settled=True)
            return
        if kind == EVENT_TYPE_CLOSED and self._placed:
            rel = self._relative(src_path)
            if rel is not None and self._placed.pop(rel, None) is not None:
                self.stats.own_writes += 1  # the descriptor that wrote a placed file closed
                return
        settled = kind in _SETTLED_KINDS and not (kind == EVENT_TYPE_ATTRIB and is_dir)
        self._note(src_path, is_dir, created=kind == EVENT_TYPE_CREATED, now=now, settled=settled)

    def _placement(self, src_path: str, dest_path: str, now: float) -> bool:
        """True if a move is lanshare's own: a temporary file put in place, or a path moved
        into the internal folder (archived). Such a move is swallowed, whether announced or
        not: the engine records what it places or archives itself."""
        src, dest = self._relative(src_path), self._relative(dest_path)
        if src is None or dest is None:
            return False
        if _temporary(src) and not _never_synced(dest):
            self._consume_own_write(dest, now)
            self._placed[dest] = now
            self.stats.own_writes += 1
            return True
        if dest.partition("/")[0] == INTERNAL_DIR and not _never_synced(src):
            self._consume_own_write(src, now)
            self._placed.pop(src, None)
            self.stats.own_writes += 1
            return True
        return False

    def _note(self, path: str, is_dir: bool, *, created: bool, now: float, settled: bool) -> None:
        rel = self._relative(path)
        if (
            rel is None
            or _never_synced(rel)
            or (self._ignore is not None and self._ignore(rel, is_dir))
        ):
            self.stats.ignored += 1
            return
        self._placed.pop(rel, None)  # touched since it was placed: its next close is news
        if self._consume_own_write(rel, now):
            self.stats.own_writes += 1
            return
        if is_dir and created and self._degraded_reason is None:
            self._probe_due = True  # new watches were needed: were they available?
        if self._full_pending is not None:
            self._full_pending.last_at = now
        elif (pending := self._pending.get(rel)) is not None:
            pending.last_at = now
            pending.settled = settled  # the latest event says whether a write is under way
        elif len(self._pending) >= self._max_batch_paths:
            first_at = min(p.first_at for p in self._pending.values())
            logger.debug(
                "%s: more than %d paths changed; rescanning the whole folder",
                self.root,
                self._max_batch_paths,
            )
            self._pending.clear()
            self._full_pending = _Pending(first_at, now)
        else:
            self._pending[rel] = _Pending(now, now, settled)
        self._arm_flush(now + (self._settle_interval if settled else self._debounce_interval))

    def _on_flush(self) -> None:
        self._flush_handle = None
        self._flush_at = math.inf
        if self._state != "running":
            return
        now = self._now()
        # The loop may run a timer up to its clock resolution early; that is close enough.
        horizon = now + 0.001
        if self._probe_due:
            self._probe_due = False
            self._probe_watches()
        full = self._full_pending
        if full is not None:
            due = self._due(full)
            if due <= horizon:
                self._emit_full_rescan("too many changes")
            else:
                self._arm_flush(due)
            return
        ready: list[str] = []
        next_at = math.inf
        for rel, pending in self._pending.items():
            due = self._due(pending)
            if due <= horizon:
                ready.append(rel)
            else:
                next_at = min(next_at, due)
        for rel in ready:
            del self._pending[rel]
        if ready:
            self._deliver(ready)
        if next_at < math.inf:
            self._arm_flush(next_at)
        self._prune_own_writes(now)

    def _on_periodic(self) -> None:
        self._periodic_handle = None
        if self._state != "running":
            return
        self._emit_full_rescan("periodic" if self._degraded_reason is None else "fallback")
        self._arm_periodic()

    def _on_inotify_overflow(self) -> None:
        if self._state != "running":
            return
        self.stats.inotify_overflows += 1
        logger.info("%s: filesystem events were lost; rescanning the whole folder", self.root)
        self._emit_full_rescan("inotify queue overflow")

    def _probe_watches(self) -> None:
        if self._degraded_reason is not None or self._watch_probe(self.root):
            return
        self._degrade(
            _limit_message(
                self.root,
                OSError(errno.ENOSPC, "inotify watch limit reached"),
                self._fallback_rescan_interval,
            )
        )
        # Part of the tree may be unwatched from now on: catch up at once.
        self._emit_full_rescan("watch limit reached")

    def _degrade(self, reason: str) -> None:
        """Fall back to periodic full rescans; warn once."""
        if self._degraded_reason is not None:
            return
        self._degraded_reason = reason
        logger.warning("%s", reason)
        if self._state == "running" and self._periodic_handle is not None:
            self._arm_periodic()

    def _emit_full_rescan(self, reason: str) -> None:
        logger.debug("%s: full rescan (%s)", self.root, reason)
        self._pending.clear()
        self._full_pending = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
            self._flush_at = math.inf
        self._ready.clear()
        self._ready_full = True
        self._batch_ready.set()

    def _deliver(self, ready: list[str]) -> None:
        if not self._ready_full:
            self._ready.update(dict.fromkeys(ready))
            if len(self._ready) > self._max_batch_paths:
                # Never grow: one full rescan covers every path waiting for the owner.
                self.stats.collapses += 1
                logger.info(
                    "%s: more than %d changed paths wait for a scan; collapsing into a full rescan",
                    self.root,
                    self._max_batch_paths,
                )
                self._ready.clear()
                self._ready_full = True
        self._batch_ready.set()

    def _arm_flush(self, at: float) -> None:
        if at >= self._flush_at:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        assert self._loop is not None
        self._flush_at = at
        self._flush_handle = self._loop.call_at(at, self._on_flush)

    def _arm_periodic(self) -> None:
        if self._periodic_handle is not None:
            self._periodic_handle.cancel()
        interval = self._rescan_interval
        if self._degraded_reason is not None:
            interval = min(interval, self._fallback_rescan_interval)
        assert self._loop is not None
        self._periodic_handle = self._loop.call_at(self._loop.time() + interval, self._on_periodic)

    def _shut_down(self) -> BaseObserver | None:
        """Stop everything on the loop side; return the observer still to be stopped."""
        with self._state_lock:
            self._state = "stopped"
            observer, self._observer = self._observer, None
        _OVERFLOW_HOOK.unregister(self._overflow_from_thread)
        for handle in (self._flush_handle, self._periodic_handle):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._periodic_handle = None
        self._flush_at = math.inf
        self._pending.clear()
        self._full_pending = None
        self._own_writes.clear()
        self._placed.clear()
        self._batch_ready.set()  # wake iterators so that they can end
        return observer

    def _due(self, pending: _Pending) -> float:
        quiet = self._settle_interval if pending.settled else self._debounce_interval
        return min(pending.last_at + quiet, pending.first_at + self._max_delay)

    def _relative(self, path: str) -> str | None:
        if not path.startswith(self._prefix):
            return None  # the root itself, or outside it
        rel = path[len(self._prefix) :]
        if os.sep != "/":
            rel = rel.replace(os.sep, "/")
        return rel or None

    def _consume_own_write(self, rel: str, now: float) -> bool:
        own = self._own_writes.get(rel)
        if own is None:
            return False
        if own.expires_at <= now:
            del self._own_writes[rel]
            return False
        own.count -= 1
        if own.count <= 0:
            del self._own_writes[rel]
        return True

    def _prune_own_writes(self, now: float) -> None:
        expired = [rel for rel, own in self._own_writes.items() if own.expires_at <= now]
        for rel in expired:
            del self._own_writes[rel]
        # A placed file whose writer's close never came (closed before the rename) waits no
        # longer than an announcement would.
        horizon = now - self._own_write_timeout
        for rel in [rel for rel, at in self._placed.items() if at <= horizon]:
            del self._placed[rel]

    def _now(self) -> float:
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        return loop.time()


def inotify_watch_available(directory: Path) -> bool:
    """False if the kernel refuses one more inotify watch (``ENOSPC``); true otherwise.

    The probe uses a private inotify instance for a moment and closes it (which frees the
    watch). Where inotify does not exist, there is no such limit: true.
    """
    try:
        from watchdog.observers import inotify_c  # Linux only
    except (ImportError, OSError):
        return True
    fd = inotify_c.inotify_init()
    if fd < 0:
        return True  # out of instances, not of watches: the observer's own start reports that
    try:
        wd = inotify_c.inotify_add_watch(
            fd, os.fsencode(directory), inotify_c.InotifyConstants.IN_DELETE_SELF
        )
        return wd >= 0 or ctypes.get_errno() != errno.ENOSPC
    finally:
        os.close(fd)


# -- private helpers ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    first_at: float
    last_at: float
    settled: bool = False
    """The latest event ended a change (a file closed after writing, renamed, deleted)."""


@dataclass(slots=True)
class _OwnWrite:
    count: int
    expires_at: float


class _Handoff(FileSystemEventHandler):
    """Runs in the observer's thread and only hands events over to the loop, in order: a
    burst of events wakes the loop once, not once each (a download makes half a dozen)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sink: Callable[[str, bytes | str, bytes | str, bool], None],
    ) -> None:
        self._loop = loop
        self._sink = sink
        self._lock = threading.Lock()
        self._pending: list[tuple[str, bytes | str, bytes | str, bool]] = []

    def dispatch(self, event: FileSystemEvent) -> None:
        item = (event.event_type, event.src_path, event.dest_path, event.is_directory)
        with self._lock:
            self._pending.append(item)
            if len(self._pending) > 1:
                return  # the loop is called already and takes this one too
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed under a stopping observer
            with self._lock:
                self._pending.clear()

    def _drain(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for item in items:
            self._sink(*item)


class _OverflowHook(logging.Handler):
    """Turns watchdog's "Inotify queue overflowed" log record into rescan requests.

    watchdog rebuilds its watches after an overflow but tells no handler that events were
    lost; the log record is the only signal. One handler serves every watcher in the process:
    the record does not say which inotify instance overflowed, so all of them rescan.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._callbacks: list[Callable[[], None]] = []
        self._saved_level: int | None = None

    def register(self, callback: Callable[[], None]) -> None:
        with self._registry_lock():
            if not self._callbacks:
                source = logging.getLogger(OVERFLOW_LOGGER)
                source.addHandler(self)
                # A record that its logger's level drops never reaches a handler: keep warnings
                # of this one logger enabled even when the application logs only errors.
                if not source.isEnabledFor(logging.WARNING):
                    self._saved_level = source.level
                    source.setLevel(logging.WARNING)
            self._callbacks.append(callback)

    def unregister(self, callback: Callable[[], None]) -> None:
        with self._registry_lock():
            if callback not in self._callbacks:
                return
            self._callbacks.remove(callback)
            if not self._callbacks:
                source = logging.getLogger(OVERFLOW_LOGGER)
                source.removeHandler(self)
                if self._saved_level is not None:
                    source.setLevel(self._saved_level)
                    self._saved_level = None

    def emit(self, record: logging.LogRecord) -> None:
        if not (isinstance(record.msg, str) and record.msg.startswith(OVERFLOW_MESSAGE)):
            return
        for callback in list(self._callbacks):  # emit() runs under self.lock
            callback()

    @contextlib.contextmanager
    def _registry_lock(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


_OVERFLOW_HOOK = _OverflowHook()


def _temporary(rel: str) -> bool:
    """A temporary file or directory anywhere in the path, outside the internal folder."""
    return rel.partition("/")[0] != INTERNAL_DIR and any(
        part.startswith(TEMP_PREFIX) for part in rel.split("/")
    )


def _never_synced(rel: str) -> bool:
    """Internal folder, or a temporary file or directory anywhere in the path."""
    first, _, _ = rel.partition("/")
    return first == INTERNAL_DIR or any(part.startswith(TEMP_PREFIX) for part in rel.split("/"))


def _stop_observer(observer: BaseObserver) -> None:
    """Stop the observer and join its threads (blocking: run it in a worker thread)."""
    observer.stop()
    if observer.ident is not None:  # join() refuses a thread that never started
        observer.join(_STOP_TIMEOUT)
        if observer.is_alive():
            logger.warning("watchdog observer did not stop within %g s", _STOP_TIMEOUT)


def _limit_message(root: Path, exc: OSError, fallback_interval: float) -> str:
    """The one warning for an inotify limit: what happened, its effect, how to fix it."""
    key, what, suggested = _LIMIT_SYSCTL.get(exc.errno or errno.ENOSPC, _LIMIT_SYSCTL[errno.ENOSPC])
    current = _read_sysctl(key)
    target = max(suggested, current * 2) if current else suggested
    return (
        f"cannot watch {root}: out of {what} ({key} = {current or 'unknown'}). Changes are "
        f"now found by a full rescan every {fallback_interval:g} s instead of at once. Raise "
        f"the limit with `sudo sysctl {key}={target}` (and make it permanent with a line "
        f"`{key} = {target}` in /etc/sysctl.d/90-lanshare.conf), then restart lanshare."
    )


def _read_sysctl(key: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys", *key.split(".")).read_text().strip())
    return 0
