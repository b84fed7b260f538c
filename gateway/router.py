"""Replica choice for each request: cache-aware cost (NVIDIA Dynamo's KV router) or round-robin.

cost(r) = w * (prompt blocks r would still have to prefill) + (KV blocks active on r)

The overlap of a prompt with replica r is the longest run of its leading block hashes that r
holds, from three sources: r's own block manager (exact, local), the blocks promised to r by
requests routed there but not yet computed (so a burst of same-prefix requests follows the first
one), and the global index in cache_service (blocks cached by any gateway). The look-ups of every
request that arrives in one event-loop tick go to cache_service in one Match call. When the index
is unreachable the router uses local knowledge only; no request waits on it.

Runs on the gateway's event loop only.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict

from gateway.block_manager import chain_hashes

PREDICTION_LIMIT = 65536  # promised hashes remembered per replica (LRU)


class Router:
    def __init__(self, engines, model_id: str, block_size: int, index=None, policy: str = "cache_aware",
                 weight: float = 2.0, log=None):
        if policy not in ("cache_aware", "round_robin"):
            raise ValueError(f"unknown routing policy {policy!r}: cache_aware or round_robin")
        self.engines = engines
        self.model_id = model_id
        self.block_size = block_size
        self.index = index  # gateway.prefix_index.PrefixIndexLink or None
        self.policy = policy
        self.weight = weight
        self.log = log
        self._rr = itertools.count()
        self._promised: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in engines]
        self._pending: list[tuple[list[bytes], asyncio.Future]] = []
        self._flush_scheduled = False

    def reset_replica(self, i: int) -> None:
        self._promised[i].clear()

    async def route(self, prompt_ids: list[int], max_tokens: int):
        """(engine to run this prompt on, KV blocks it is expected to add there)."""
        total = -(-(len(prompt_ids) + max_tokens) // self.block_size)
        if len(self.engines) == 1 or self.policy == "round_robin":
            engine = self.engines[0 if len(self.engines) == 1 else next(self._rr) % len(self.engines)]
            return engine, total
        hashes = chain_hashes(self.model_id, prompt_ids, self.block_size)
        remote = await self._global_overlaps(hashes) if hashes and self.index is not None else {}
        best, best_cost, best_new = 0, None, total
        overlaps = []
        for i, engine in enumerate(self.engines):
            overlap = max(self._local_overlap(i, hashes), remote.get(engine.replica_id, 0))
            overlaps.append((self._local_overlap(i, hashes), remote.get(engine.replica_id, 0), len(self._promised[i])))
            prefill = len(hashes) - overlap
            cost = self.weight * prefill + engine.active_blocks
            if best_cost is None or cost < best_cost:
                best, best_cost, best_new = i, cost, total - overlap
        self._promise(best, hashes)
        if self.log is not None:
            self.log.debug("routed", replica=best, cost=best_cost, overlap=total - best_new,
                           loads=[e.active_blocks for e in self.engines], overlaps=overlaps, h0=hashes[0].hex()[:6] if hashes else "")
        return self.engines[best], best_new

    # -- internals -----------------------------------------------------------------------------
    def _local_overlap(self, i: int, hashes: list[bytes]) -> int:
        cached = self.engines[i].scheduler.bm.cached_hashes
        promised = self._promised[i]
        n = 0
        for h in hashes:
            if h not in cached and h not in promised:
                break
            n += 1
        return n

    def _promise(self, i: int, hashes: list[bytes]) -> None:
        promised = self._promised[i]
        for h in hashes:
            promised[h] = None
            promised.move_to_end(h)
        while len(promised) > PREDICTION_LIMIT:
            promised.popitem(last=False)

    async def _global_overlaps(self, hashes: list[bytes]) -> dict[str, int]:
        """This request's overlaps from the global index, batched with its tick's neighbours."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((hashes, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        return await fut

    async def _flush(self) -> None:
        batch, self._pending, self._flush_scheduled = self._pending, [], False
        results = await self.index.match([h for h, _ in batch])
        for (_, fut), res in zip(batch, results or [{} for _ in batch]):
            if not fut.done():
                fut.set_result(res)
