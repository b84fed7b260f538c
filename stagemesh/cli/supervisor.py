"""Child processes of `stagemesh up`, kept running: a child that exits is started again.

Each child is a command that prints a line containing `ready` on stdout once it serves. The
supervisor starts it, passes its output through to our stderr (keeping the last lines for an
error message), and, when it exits while the mesh is not stopping, starts the same command again
after a backoff: `initial_backoff_s` doubling to `max_backoff_s`, back to the start once a run
stayed up `stable_after_s`. A child whose runs keep failing at start (exit before ready, no ready
line within `start_timeout_s`, or exit within `stable_after_s` of it) `max_start_failures` times
in a row makes the supervisor give up (`GaveUp`): the caller stops everything and says why.

Every child is started from the thread that calls `spawn`/`poll` (the launcher's main thread),
because PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
Not thread-safe: one thread drives it.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from stagemesh.proc import die_with_parent

TAIL_LINES = 20


@dataclass(frozen=True)
class RestartPolicy:
    start_timeout_s: float = 300.0  # from (re)start to the ready line; a large stage loads for long
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    stable_after_s: float = 10.0  # a run up this long after ready resets backoff and failure count
    max_start_failures: int = 5  # failed runs in a row before giving up

    def __post_init__(self):
        if self.start_timeout_s <= 0 or self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("--start-timeout-s and backoffs must be > 0, max backoff >= initial")
        if self.max_start_failures < 1:
            raise ValueError("max_start_failures must be >= 1")


class GaveUp(RuntimeError):
    """A child kept failing at start; the message names it and ends with its last output lines."""


@dataclass
class Child:
    name: str
    cmd: list[str]
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0
    ready_at: float = 0.0  # monotonic time of the ready line of the current run; 0: not yet
    failures: int = 0  # failed runs in a row
    restarts: int = 0
    restart_at: float = 0.0  # when the next run starts; 0: none scheduled
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, policy: RestartPolicy | None = None, out=None):
        self.policy = policy or RestartPolicy()
        self.children: list[Child] = []
        self._out = out or sys.stderr

    # -- starting ------------------------------------------------------------------------------
    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None, note: str = "") -> Child:
        """Start a child now. `env`: extra variables on top of ours (e.g. secrets kept off argv)."""
        child = Child(name, list(cmd), dict(env) if env else None)
        self.children.append(child)
        self._start(child)
        self.say(f"started {name} pid {child.pid}{f' ({note})' if note else ''}")
        return child

    def _start(self, child: Child) -> None:
        env = {**os.environ, **child.env} if child.env else None
        child.ready = threading.Event()
        child.ready_at = 0.0
        child.restart_at = 0.0
        child.proc = subprocess.Popen(child.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env, preexec_fn=die_with_parent)
        child.started_at = time.monotonic()
        threading.Thread(target=_pump, args=(child.proc.stdout, child, True), daemon=True).start()
        threading.Thread(target=_pump, args=(child.proc.stderr, child, False), daemon=True).start()

    def wait_ready(self, child: Child, stop: threading.Event) -> bool:
        """Until `child` serves (restarting it as needed); False if `stop` was set first. GaveUp."""
        while not stop.is_set():
            if child.ready.is_set() and child.running():
                return True
            self.poll()
            stop.wait(0.05)
        return False

    # -- watching ------------------------------------------------------------------------------
    def poll(self) -> None:
        """Notice exits and missed start deadlines, start due restarts. Raises GaveUp."""
        now = time.monotonic()
        for child in self.children:
            if child.ready.is_set() and not child.ready_at:
                child.ready_at = now
                if child.restarts:
                    self.say(f"{child.name} pid {child.pid} ready again after {now - child.started_at:.1f}s")
            if child.ready_at and now - child.ready_at >= self.policy.stable_after_s:
                child.failures = 0
            if child.restart_at:
                if now >= child.restart_at:
                    self._start(child)
                    child.restarts += 1
                    self.say(f"restarted {child.name} pid {child.pid} (restart {child.restarts})")
                continue
            code = child.proc.poll()
            if code is None and not child.ready_at and now - child.started_at > self.policy.start_timeout_s:
                self._kill(child)
                code = child.proc.returncode
                why = f"not ready within --start-timeout-s {self.policy.start_timeout_s:g}"
            elif code is None:
                continue
            else:
                why = _exit_words(code)
            self._exited(child, why, now)

    def _exited(self, child: Child, why: str, now: float) -> None:
        up_s = now - child.started_at
        stable = bool(child.ready_at) and now - child.ready_at >= self.policy.stable_after_s
        child.failures = 0 if stable else child.failures + 1
        if child.failures >= self.policy.max_start_failures:
            tail = "".join(child.tail).rstrip() or "(no output)"
            raise GaveUp(f"{child.name} failed at start {child.failures} times in a row (last: {why} "
                         f"after {up_s:.1f}s); giving up. Its last output:\n{tail}")
        delay = min(self.policy.max_backoff_s,
                    self.policy.initial_backoff_s * 2 ** max(0, child.failures - 1))
        child.restart_at = now + delay
        self.say(f"{child.name} pid {child.pid} {why} after {up_s:.1f}s; restarting in {delay:g}s")

    # -- stopping ------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every running child (last started first), then SIGKILL what is left."""
        for child in reversed(self.children):
            child.restart_at = 0.0
            if child.running():
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(child)

    @staticmethod
    def _kill(child: Child) -> None:
        child.proc.kill()
        child.proc.wait()

    def say(self, message: str) -> None:
        self._out.write(f"stagemesh up: {message}\n")
        self._out.flush()


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _pump(stream, child: Child, is_stdout: bool) -> None:
    """Pass a child's output through to our stderr, keeping its tail; stdout's ready line sets ready."""
    ready = child.ready  # this run's event: a later run gets a new one
    for line in stream:
        child.tail.append(line)
        if is_stdout and not ready.is_set() and "ready" in line:
            ready.set()
            continue
        sys.stderr.write(line)
