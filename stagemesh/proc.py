"""Process lifecycle helpers: wait for SIGINT/SIGTERM, make children die with their parent."""

from __future__ import annotations

import asyncio
import ctypes
import signal


async def wait_for_signal() -> int:
    """Block until SIGINT or SIGTERM; returns the signal number."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: fut.done() or fut.set_result(s))
    return await fut


def die_with_parent() -> None:
    """preexec_fn for children: SIGTERM them if the parent dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
