"""The gateway's link to the global prefix index (cache_service): batched events, fallback.

Block-manager events are queued here and published in one Publish call per flush interval.
When cache_service or Redis is unreachable, events are dropped, matching falls back to local
knowledge (Match answers None), and the link keeps trying; once the index answers again, each
replica's entries are cleared and re-published from the block managers' current state, so the
index is repopulated without replaying lost events. A Redis that comes back empty between two
calls raises no error: the link polls the index's epoch (a token kept in Redis, gone with its
data) every `epoch_interval_s` and republishes the same way when it changes. Any other error the
index answers with is logged and handled as unreachable: the link's task must not die of it (a
dead task would leave the index unwritten from then on, silently).

Runs on the gateway's event loop only.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from stagemesh.cache_client import CacheIndexClient, IndexUnavailable

Snapshot = Callable[[], list[tuple[str, list[bytes]]]]


class PrefixIndexLink:
    def __init__(self, target: str, log, flush_interval_s: float = 0.02, retry_interval_s: float = 1.0, tls=None,
                 epoch_interval_s: float = 0.5):
        self.client = CacheIndexClient(target, tls=tls)
        self.log = log
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.epoch_interval_s = epoch_interval_s
        self._epoch: str | None = None  # the index's epoch as last seen
        self.resyncs = 0  # full republishes done (the first one included)
        self.available = True
        self._stale = True  # nothing published yet: start with a clear + full sync
        self._syncing = False  # a resync's Publish is in flight: events from now on are kept
        self._stored: list[tuple[str, bytes]] = []
        self._removed: list[tuple[str, bytes]] = []
        self._cleared: list[str] = []
        self._task: asyncio.Task | None = None

    def start(self, snapshot: Snapshot) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(snapshot))

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()

    def publish(self, replica_id: str, stored: list[bytes], removed: list[bytes]) -> None:
        if self._stale and not self._syncing:
            return  # the next resync's snapshot holds them
        self._stored.extend((replica_id, h) for h in stored)
        self._removed.extend((replica_id, h) for h in removed)

    def clear(self, replica_id: str) -> None:
        self._cleared.append(replica_id)

    async def match(self, chains: list[list[bytes]]) -> list[dict[str, int]] | None:
        if not self.available:
            return None
        try:
            return await self.client.match(chains)
        except IndexUnavailable as exc:
            self._mark_down(exc)
            return None
        except Exception as exc:  # the index is a hint: any other answer falls back to local matching
            self.log.error("prefix_index_error", error=repr(exc))
            self._mark_down(exc)
            return None

    async def _run(self, snapshot: Snapshot) -> None:
        loop = asyncio.get_running_loop()
        next_probe = 0.0
        while True:
            try:
                if loop.time() >= next_probe:
                    next_probe = loop.time() + self.epoch_interval_s
                    await self._probe_epoch()
                if self._stale:
                    await self._resync(snapshot)
                    await asyncio.sleep(self.retry_interval_s if self._stale else self.flush_interval_s)
                    continue
                await self._flush()
                await asyncio.sleep(self.flush_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any other answer (INTERNAL, ...): this task must not die with it
                self.log.error("prefix_index_error", error=repr(exc))
                self._mark_down(exc)  # stale: a full resync once the index answers again
                await asyncio.sleep(self.retry_interval_s)

    async def _probe_epoch(self) -> None:
        """A changed epoch: Redis lost the index (restarted empty, flushed): republish it all."""
        try:
            epoch = await self.client.epoch()
        except IndexUnavailable as exc:
            self._mark_down(exc)
            return
        if self._epoch is not None and epoch != self._epoch and not self._stale:
            self.log.warning("prefix_index_lost", old_epoch=self._epoch, epoch=epoch)
            self._stale = True
            self._stored, self._removed = [], []
        self._epoch = epoch

    async def _flush(self) -> None:
        if not (self._stored or self._removed or self._cleared):
            return
        stored, removed, cleared = self._stored, self._removed, self._cleared
        self._stored, self._removed, self._cleared = [], [], []
        try:
            await self.client.publish(stored=stored, removed=removed, cleared=cleared)
        except IndexUnavailable as exc:
            self._cleared[:0] = cleared  # replicas gone from the snapshot are cleared by the next resync only so
            self._mark_down(exc)

    async def _resync(self, snapshot: Snapshot) -> None:
        """Clear every replica and publish the snapshot; events that come while that call is in
        flight (a request finishing meanwhile) are kept and flushed after it, not dropped: the
        snapshot was taken before them."""
        state = snapshot()
        sent_clears = len(self._cleared)
        cleared = list(dict.fromkeys(self._cleared + [rid for rid, _ in state]))
        stored = [(rid, h) for rid, hashes in state for h in hashes]
        self._stored, self._removed = [], []  # all in the snapshot
        self._syncing = True
        try:
            await self.client.publish(stored=stored, cleared=cleared)
        except IndexUnavailable as exc:
            self._mark_down(exc)
            return
        finally:
            self._syncing = False
        del self._cleared[:sent_clears]
        self._stale = False
        self.resyncs += 1
        if not self.available:
            self.log.info("prefix_index_back", replicas=len(state), blocks=len(stored))
        self.available = True

    def _mark_down(self, exc: Exception) -> None:
        if self.available:
            self.log.warning("prefix_index_unavailable", error=str(exc))
        self.available = False
        self._stale = True
        if not self._syncing:  # else they came after the snapshot in flight: a successful resync flushes them
            self._stored, self._removed = [], []
