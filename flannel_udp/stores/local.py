"""The embedded lease store: one msgpack file shared by the daemons of one machine.

Writers serialise on an flock of '<path>.lock' and replace the file atomically, so readers never
lock and never see half a file. Leases carry their expiration; an expired lease is absent for
every reader and is purged by the next writer. A watcher polls the file (and the clock, for
expiry) every WATCH_INTERVAL seconds, which keeps every daemon within 1 s of the truth: a poll
that finds the file's inode, mtime and size unchanged and no lease due to expire costs one
stat(), whatever the number of leases; only a changed file is read and compared again.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack

from flannel_udp.stores import (
    KeyFilter,
    LeaseEvent,
    LeaseRecord,
    Snapshot,
    StoreError,
    every_key,
    no_key,
)

FORMAT = "flannel-udp-leases/1"
WATCH_INTERVAL = 0.2


class StoreCorrupt(StoreError):
    pass


class LocalStore:
    """Store on a local file; see `flannel_udp.stores.Store` for the contract of each method."""

    keyspace = "embedded"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    # -- file access (blocking; the async API runs these in a worker thread) --

    def _empty(self) -> dict[str, Any]:
        return {"format": FORMAT, "revision": 0, "config": None, "leases": {}}

    def _load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return self._empty()
        except OSError as e:
            raise StoreError(f"cannot read lease store {self.path}: {e.strerror}") from None
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated types for bad input
            raise StoreCorrupt(f"lease store {self.path} is corrupt ({e}); move it aside to "
                               "start over (every host will then lease anew)") from None
        if (not isinstance(data, dict) or data.get("format") != FORMAT
                or not isinstance(data.get("leases"), dict)
                or not isinstance(data.get("revision"), int)):
            raise StoreCorrupt(f"lease store {self.path} is corrupt (not a {FORMAT} file); "
                               "move it aside to start over")
        return data

    @contextmanager
    def _locked(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open lease store {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _save(self, data: dict[str, Any]) -> None:
        data["revision"] += 1
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(msgpack.packb(data, use_bin_type=True))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _modify(self, change) -> Any:
        """Run change(data) under the lock on fresh data, purge expired leases, save."""
        with self._locked():
            data = self._load()
            now = time.time()
            data["leases"] = {k: v for k, v in data["leases"].items()
                              if v.get("expires") is None or v["expires"] > now}
            result = change(data, now)
            self._save(data)
            return result

    @staticmethod
    def _live(data: dict[str, Any], now: float) -> dict[str, LeaseRecord]:
        live = {}
        for key, entry in data["leases"].items():
            expires = entry.get("expires") if isinstance(entry, dict) else None
            if expires is None or expires > now:
                value = entry.get("value", b"") if isinstance(entry, dict) else b""
                if isinstance(value, str):
                    value = value.encode()
                live[key] = LeaseRecord(key, value, expires)
        return live

    # -- the Store API --

    async def get_config(self) -> bytes | None:
        config = (await asyncio.to_thread(self._load))["config"]
        return config.encode() if isinstance(config, str) else config

    async def set_config(self, value: bytes, create_only: bool = False) -> bool:
        def change(data: dict[str, Any], now: float) -> bool:
            if create_only and data["config"] is not None:
                return False
            data["config"] = value
            return True
        return await asyncio.to_thread(self._modify, change)

    async def list_leases(self, expiry_of: KeyFilter = every_key) -> Snapshot:
        data = await asyncio.to_thread(self._load)
        live = self._live(data, time.time())
        return Snapshot(data["revision"], tuple(live.values()))

    async def create_lease(self, key: str, value: bytes, ttl: float) -> float | None:
        def change(data: dict[str, Any], now: float) -> float | None:
            if key in data["leases"]:
                return None
            data["leases"][key] = {"value": value, "expires": now + ttl}
            return now + ttl
        return await asyncio.to_thread(self._modify, change)

    async def put_lease(self, key: str, value: bytes, ttl: float | None) -> float | None:
        def change(data: dict[str, Any], now: float) -> float | None:
            expires = None if ttl is None else now + ttl
            data["leases"][key] = {"value": value, "expires": expires}
            return expires
        return await asyncio.to_thread(self._modify, change)

    async def delete_lease(self, key: str) -> None:
        def change(data: dict[str, Any], now: float) -> None:
            data["leases"].pop(key, None)
        await asyncio.to_thread(self._modify, change)

    async def watch(self, since: Snapshot, expiry_of: KeyFilter = no_key
                    ) -> AsyncIterator[list[LeaseEvent]]:
        known = {r.key: r for r in since.records}
        stamp: tuple[int, int, int] | None | bool = False  # False: never looked
        changed_at = time.time()
        next_expiry = _next_expiry(known)
        while True:
            try:
                st = os.stat(self.path)
                new_stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                new_stamp = None
            now = time.time()
            if new_stamp != stamp:
                # Read whole only when the file was replaced or written: the time it was
                # written is when its changes happened.
                data = await asyncio.to_thread(self._load)
                stamp = new_stamp
                changed_at = now if new_stamp is None else new_stamp[1] / 1e9
                live = self._live(data, now)
            elif now >= next_expiry:
                # Nothing written, but a lease is due: only expiries can have changed.
                live = {k: r for k, r in known.items()
                        if r.expiration is None or r.expiration > now}
            else:
                await asyncio.sleep(WATCH_INTERVAL)
                continue
            events = [LeaseEvent("delete", r, _gone_at(r, now, changed_at))
                      for k, r in known.items() if k not in live]
            # A new expiry is a change too (as every put is one in etcd): a lease made a
            # reservation keeps its value, and its holder must learn that it never expires.
            events += [LeaseEvent("put", r, changed_at)
                       for k, r in live.items() if known.get(k) != r]
            known = live
            next_expiry = _next_expiry(known)
            if events:
                yield events
            await asyncio.sleep(WATCH_INTERVAL)

    async def close(self) -> None:
        pass


def _next_expiry(records: dict[str, LeaseRecord]) -> float:
    """When the first of `records` expires (inf: none ever does)."""
    return min((r.expiration for r in records.values() if r.expiration is not None),
               default=float("inf"))


def _gone_at(record: LeaseRecord, now: float, changed_at: float) -> float:
    """When a lease that went away went: its expiry if that has passed, else (deleted) when
    the file was written."""
    if record.expiration is not None and record.expiration <= now:
        return record.expiration
    return changed_at
