"""The order of work on the gateway's event loop after a step returns: clients' deltas wait for
the next step to be sent.

A returned step's sinks (gateway/server.py RequestStream) post their deltas here while the
engine (gateway/engine.py) applies the step and makes the Forward call that takes its slot; the
deltas reach the stream queues in one callback queued after that call's own tasks. With hundreds
of streams each delta's gRPC write costs ~40 us of CPU, and without this the next Forward queued
behind every one of them.

Pure asyncio (no grpc, no torch): the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib


class Outbox:
    """Deltas for the clients' stream queues, held while an engine applies a step and sends the
    next one, then handed over in one callback, in the order they were posted (shared by every
    engine of a gateway, so a stream's deltas stay in order wherever its sequence runs)."""

    def __init__(self) -> None:
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._holds = 0
        self._flush: asyncio.Handle | None = None

    def put(self, queue: asyncio.Queue, item) -> None:
        if self._holds or self._pending:  # behind what waits already: a stream's order is kept
            self._pending.append((queue, item))
        else:
            queue.put_nowait(item)

    @contextlib.contextmanager
    def hold(self):
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds and self._pending:  # behind whatever this hold queued (an RPC's tasks)
                if self._flush is not None:
                    self._flush.cancel()
                self._flush = asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        self._flush = None
        pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)
