"""What a stranger's INITIAL may cost the endpoint: key trials, half-open sessions, replays.

Pure: no sockets, clock or files. Every time is the endpoint's ``now``, handed in.

Theory of operation
-------------------
Before a handshake completes, the responder cannot know who it talks to, and a stranger
without the folder key can still make it work in two ways:

- **Key trials.** Every INITIAL is opened under each accepted folder's PSK until one fits
  (``crypto.key_trial``: one hash, one HKDF, one AES-GCM open; about 7 µs on a laptop core,
  several times that on a small ARM board). Garbage fails every trial and leaves no state,
  so nothing else would ever limit it.
- **Half-open sessions.** A *recorded* INITIAL of a real key holder opens a session when
  replayed (it decrypts fine), and that session waits for the initiator's first DATA packet
  until the handshake times out (``idle_timeout``). Replayed from many source ports, with the
  retry tokens it asks for at its own address, it used to fill the whole session table.

The defences, each bounded in memory:

- ``ReplayCache``: the initiator's ephemeral key of every INITIAL that opened a session,
  with the (address, connection id) it came from, kept ``lifetime`` seconds (as long as a
  half-open session lives). The same ephemeral key from any other (address, cid) is a replay
  and is dropped before any key trial; from the same one it is the initiator repeating
  itself (its RESPONSE was lost), which is answered as before. ``REPLAY_CACHE_SIZE`` entries
  at most, the oldest forgotten first.
- ``HalfOpen``: at most ``MAX_HALF_OPEN_PER_SOURCE`` half-open sessions per source and
  ``limit`` in all; a source is what ``strikes.ban_key`` holds an address by (the IPv4 host,
  the IPv6 /64), since one host may use any port and any address of its /64. One more that
  would pass a bound evicts the oldest half-open session of its own source, or else of the
  source that holds the most: a flood evicts its own sessions first, and a peer whose
  half-open session was evicted repeats its INITIAL and gets another. The endpoint keeps
  ``limit`` at half its session table at most, and evicts a half-open session the same way
  when the table is full and a new session (ours or a peer's) must fit.
- ``TrialBudget``: key trials are paid from token buckets refilled on the endpoint's clock:
  one per source (``SOURCE_TRIAL_RATE``) and one for all (``TRIAL_RATE``). Sources that
  completed a handshake recently (``GOOD_SOURCES`` of them, most recent kept) are served
  first: strangers may not draw the common bucket below ``GOOD_RESERVE``, the part of it
  kept for known peers. It also measures the load, the key trials asked for per second
  (served or not, decaying with ``LOAD_HALF_LIFE``); above ``RETRY_LOAD`` the endpoint asks
  every INITIAL without a valid token for one (a stateless RETRY, which costs no key trial),
  so that under load every key trial is paid by an address that proved it receives what we
  send to it: a spoofed source then cannot spend another's budget.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Generic, TypeVar

from lanshare.protocol.congestion import TokenBucket

if TYPE_CHECKING:
    from lanshare.events import Addr

T = TypeVar("T")

#: Ephemeral keys remembered: far more sessions than one node opens within one half-open
#: lifetime (the table holds 256), at ~150 bytes each (~600 KiB at most).
REPLAY_CACHE_SIZE = 4096
#: One per folder an honest node shares with us, all opened at once when it starts: 16
#: covers a dozen folders with room, and keeps one host to a quarter of the default 64.
MAX_HALF_OPEN_PER_SOURCE = 16
#: Key trials per second over all sources, and the burst the common bucket holds (one
#: second's worth). At ~7 µs a trial that is ~1.5 % of a laptop core, ~10 % of a small ARM
#: board's; it still lets 20 peers reconnect for a dozen folders at once (20 x 12 INITIALs of
#: at most 12 trials, ~1,500 on average).
TRIAL_RATE = 2000.0
TRIAL_BURST = 2000.0
#: The part of the common bucket strangers may not use: a known peer coming back for 12
#: folders costs at most 144 trials, so a few of them get in at once during a flood.
GOOD_RESERVE = 500.0
#: Key trials per second for one source, and its burst: a tenth of the total, so one
#: flooding host leaves the rest to the others; 400 lets a node open sessions for up to 20
#: folders against 20 of ours at once.
SOURCE_TRIAL_RATE = 200.0
SOURCE_TRIAL_BURST = 400.0
#: Per-source buckets kept (most recently used): a source forgotten starts full again, which
#: the common bucket still bounds.
MAX_SOURCES = 1024
#: Sources that completed a handshake remembered (most recently used): every peer of a
#: large LAN, about as many as the session table holds.
GOOD_SOURCES = 256
#: Key trials asked for per second above which INITIALs must carry a retry token: a quarter
#: of ``TRIAL_RATE``, far above what honest nodes ask between reconnects (nothing, since
#: sessions last) and reached by a handful of nodes reconnecting at once, which then pay one
#: round trip more.
RETRY_LOAD = TRIAL_RATE / 4
#: Seconds over which the measured load halves: a flood keeps retry engaged, and a few
#: seconds after it stops INITIALs are answered directly again.
LOAD_HALF_LIFE = 1.0


class ReplayCache:
    """Ephemeral keys of INITIALs that opened sessions, with where each came from."""

    __slots__ = ("_entries", "_lifetime", "_size")

    def __init__(self, lifetime: float, size: int = REPLAY_CACHE_SIZE) -> None:
        self._lifetime = lifetime
        self._size = size
        self._entries: OrderedDict[bytes, tuple[tuple[Addr, int], float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def is_replay(self, ephemeral: bytes, origin: tuple[Addr, int], now: float) -> bool:
        """Whether ``ephemeral`` opened a session from another origin within the lifetime."""
        entry = self._entries.get(ephemeral)
        if entry is None:
            return False
        if entry[1] <= now:
            del self._entries[ephemeral]
            return False
        return entry[0] != origin

    def add(self, ephemeral: bytes, origin: tuple[Addr, int], now: float) -> None:
        entries = self._entries
        entries.pop(ephemeral, None)
        entries[ephemeral] = (origin, now + self._lifetime)
        # Entries are in the order they were added, so expired ones are at the front.
        while entries:
            oldest = next(iter(entries.values()))
            if len(entries) <= self._size and oldest[1] > now:
                break
            entries.popitem(last=False)


class HalfOpen(Generic[T]):
    """Half-open sessions by source, oldest first, and which one must go for a new one."""

    __slots__ = ("_by_source", "_source", "limit", "per_source")

    def __init__(self, limit: int, per_source: int = MAX_HALF_OPEN_PER_SOURCE) -> None:
        self.limit = limit
        self.per_source = per_source
        self._source: dict[T, str] = {}
        self._by_source: dict[str, dict[T, None]] = {}

    def __len__(self) -> int:
        return len(self._source)

    def count(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def add(self, item: T, source: str) -> None:
        self._source[item] = source
        self._by_source.setdefault(source, {})[item] = None

    def discard(self, item: T) -> None:
        source = self._source.pop(item, None)
        if source is None:
            return
        own = self._by_source[source]
        del own[item]
        if not own:
            del self._by_source[source]

    def victim(self, source: str) -> T | None:
        """The session to evict before one more from ``source`` fits (None: it fits)."""
        own = self._by_source.get(source)
        if own is not None and len(own) >= self.per_source:
            return next(iter(own))
        if len(self._source) >= self.limit:
            return self.oldest_of_busiest()
        return None

    def oldest_of_busiest(self) -> T | None:
        """The oldest half-open session of the source holding the most (None: there is none)."""
        if not self._by_source:
            return None
        busiest = max(self._by_source.values(), key=len)
        return next(iter(busiest))


class TrialBudget:
    """Key trials allowed per source and in all, known peers first, and the load measured."""

    __slots__ = ("_common", "_good", "_load", "_load_at", "_sources")

    def __init__(self) -> None:
        self._common = TokenBucket(TRIAL_RATE, TRIAL_BURST)
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._good: OrderedDict[str, None] = OrderedDict()
        self._load = 0.0
        self._load_at = 0.0

    def demand(self, trials: int, now: float) -> float:
        """Count ``trials`` asked for at ``now``; the load in trials per second since."""
        if now > self._load_at:
            self._load *= 2.0 ** ((self._load_at - now) / LOAD_HALF_LIFE)
            self._load_at = now
        self._load += trials
        # A rate r sustained keeps r * half-life / ln 2 trials in the decaying sum.
        return self._load * math.log(2) / LOAD_HALF_LIFE

    def affordable(self, source: str, trials: int, now: float) -> bool:
        """Whether ``take`` could pay now (pays nothing, remembers no new source)."""
        common = self._common
        common.refill(now)
        need = self._need(trials)
        if common.tokens - need < (0.0 if source in self._good else GOOD_RESERVE):
            return False
        bucket = self._sources.get(source)
        return bucket is None or bucket.refill(now) >= min(need, bucket.capacity)

    def take(self, source: str, trials: int, now: float) -> bool:
        """Pay ``trials`` for ``source`` if both its bucket and the common one allow it."""
        common = self._common
        common.refill(now)
        need = self._need(trials)
        if common.tokens - need < (0.0 if source in self._good else GOOD_RESERVE):
            return False
        bucket = self._sources.pop(source, None)
        if bucket is None:
            bucket = TokenBucket(SOURCE_TRIAL_RATE, SOURCE_TRIAL_BURST, now)
        self._sources[source] = bucket
        if len(self._sources) > MAX_SOURCES:
            self._sources.popitem(last=False)
        bucket.refill(now)
        own = min(need, bucket.capacity)
        if bucket.tokens < own:
            return False
        bucket.tokens -= own
        common.tokens -= need
        return True

    @staticmethod
    def _need(trials: int) -> float:
        # More trials than a bucket holds (hundreds of folders) cost one full bucket: the
        # INITIAL is still tried, at the rate the bucket refills.
        return min(float(trials), TRIAL_BURST - GOOD_RESERVE)

    def mark_good(self, source: str) -> None:
        """``source`` completed a handshake: serve it first from now on."""
        self._good.pop(source, None)
        self._good[source] = None
        if len(self._good) > GOOD_SOURCES:
            self._good.popitem(last=False)
