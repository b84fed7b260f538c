"""`stagemesh up`: the whole mesh on this host as separate processes on loopback.

Starts the coordinator, then stages x replicas stage workers, then the gateway; prints one line
containing `ready` when the gateway serves. From then on it supervises (stagemesh.cli.supervisor): a
child that exits is started again with the same command, so on the same address: the coordinator
from its state file (kept in the run directory unless --state-file names one), a worker
registering again, cache_service and the gateway on their ports. It stops on SIGINT/SIGTERM, or
when a child keeps failing at start. Children get SIGTERM from the kernel if this process dies,
so none is orphaned.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field

from gateway.config import GatewayConfig
from stagemesh import membership
from stagemesh.cli.supervisor import RestartPolicy, Supervisor
from stagemesh.config_cli import default_of, knob
from stagemesh.net import free_port

STATE_FILE_NAME = "coordinator-state.json"


@dataclass
class MeshConfig:
    """`up`'s own settings (its flags, built by config_cli) and the flags it passes through to each
    service, composed from that service's config fields (stagemesh/cli/commands.py), so a
    service's default lives once, in its config."""

    model_dir: str = knob(help="Hugging Face checkpoint directory, or a .gguf file", flag="--model")
    stages: int = knob(1, "pipeline stages per replica")
    replicas: int = knob(1, "replicas of the whole model")
    spares: int = knob(0, "idle workers kept for failover")
    host: str = knob(default_of(GatewayConfig, "host"),
                     "address every port binds (default loopback: this host only); another exposes the mesh")
    redis: str = knob("", "redis://HOST:PORT/DB for the global prefix index (a password in it reaches "
                          "cache_service in its environment)")
    threads: int = knob(0, "torch threads per worker (0: cores / workers on the CPU, 1 on a GPU)")
    # The layout of compose/prometheus.yml, shifted to BASE.
    metrics_port: int = knob(0, "Prometheus /metrics: gateway BASE, coordinator BASE+1, cache_service BASE+2, "
                                "worker i BASE+10+i (0: off)")
    # Certificates written by `stagemesh certs DIR`: mutual TLS on every internal link (server.pem,
    # the member role, on every process), TLS on the gateway's public port.
    tls_dir: str = knob("", "certificates from `stagemesh certs DIR`: mutual TLS inside the mesh, TLS on --port")
    run_dir: str = knob("", "directory for up's files (the coordinator's state file); default: a temp dir "
                            "removed at exit")
    # Worker ports are new each run, so an old plan names nobody: the default file is cleared.
    state_file: str = knob("", "the coordinator's plan, kept across its restarts (default: "
                               "RUN_DIR/coordinator-state.json, cleared at start)")
    start_timeout_s: float = knob(300.0, "each child must print its ready line within this long of its (re)start "
                                         "(the gateway's includes the workers loading their layers)")
    max_start_failures: int = knob(5, "stop the mesh when one child fails at start this many times in a row "
                                      "(exits before ready, misses --start-timeout-s, or dies within 10 s of ready)")
    log_level: str = knob("warning", "every child's log level")
    port: int = default_of(GatewayConfig, "port")  # the gateway's --port (a pass-through flag of up)
    # Secrets, handed to the children in their environment, never on their command lines
    # (stagemesh/membership.py): the gateway's API keys, and the cluster token every internal
    # service demands (empty: $STAGEMESH_CLUSTER_TOKEN if set, else a fresh one per run).
    api_keys: tuple[str, ...] = ()
    cluster_token: str = ""
    # Pass-through flags of each service (config_cli.to_argv of its own config fields).
    coordinator_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.stages < 1 or self.replicas < 1 or self.spares < 0:
            raise ValueError("--stages and --replicas must be >= 1, --spares >= 0")
        if self.start_timeout_s <= 0:
            raise ValueError("--start-timeout-s must be > 0")
        if self.max_start_failures < 1:
            raise ValueError("--max-start-failures must be >= 1")


class Mesh:
    """The children of `stagemesh up`. Driven from one thread (see stagemesh.cli.supervisor)."""

    def __init__(self, config: MeshConfig):
        self.config = config
        self.supervisor = Supervisor(RestartPolicy(start_timeout_s=config.start_timeout_s,
                                                   max_start_failures=config.max_start_failures))
        self.coordinator_address = ""
        self.run_dir = ""
        self.state_file = ""
        self._own_run_dir = False
        self.cluster_token = config.cluster_token or membership.cluster_token() or membership.new_token()

    def start(self, stop: threading.Event | None = None) -> str | None:
        """Start every process; the gateway address once it serves, None if `stop` was set first.

        Raises GaveUp when a child keeps failing at start."""
        cfg = self.config
        stop = stop or threading.Event()
        py = sys.executable
        self._prepare_run_dir()
        coord_port = free_port()
        coord = f"{cfg.host}:{coord_port}"
        self.coordinator_address = coord
        tls = self._tls_args()
        # Coordinator, cache_service and workers start side by side (a worker registers once the
        # coordinator answers: its first seconds are the torch import and a layer profile); the
        # gateway once the coordinator and cache_service serve.
        first = [self.supervisor.spawn("coordinator", [
            py, "-m", "coordinator", "--model", cfg.model_dir, "--stages", str(cfg.stages),
            "--replicas", str(cfg.replicas), "--host", cfg.host, "--port", str(coord_port),
            "--log-level", cfg.log_level, "--state-file", self.state_file, *cfg.coordinator_args,
            *self._metrics_args(1), *tls], env=self._secrets(), note=coord)]
        cache_args: list[str] = []
        if cfg.redis:
            cache_port = free_port()
            first.append(self.supervisor.spawn("cache_service", [
                py, "-m", "cache_service", "--host", cfg.host, "--port", str(cache_port),
                "--log-level", cfg.log_level, *self._metrics_args(2), *tls],
                env=self._secrets(**{membership.REDIS_URL_ENV: cfg.redis}), note=f"{cfg.host}:{cache_port}"))
            cache_args = ["--cache-service", f"{cfg.host}:{cache_port}"]
        n_workers = cfg.stages * cfg.replicas + cfg.spares
        worker_cmd = [py, "-m", "stage_worker", "--model", cfg.model_dir, "--coordinator", coord,
                      "--threads", str(cfg.threads), "--cpu-share", str(n_workers), "--log-level", cfg.log_level,
                      *cfg.worker_args, *tls]
        for i in range(n_workers):
            # A fixed port: a restarted worker comes back at the address the (persisted) plan names.
            port = free_port()
            self.supervisor.spawn(f"worker{i}", [*worker_cmd, "--host", cfg.host, "--port", str(port),
                                                 *self._metrics_args(10 + i)], env=self._secrets(),
                                  note=f"{cfg.host}:{port}")
        if not all(self.supervisor.wait_ready(child, stop) for child in first):
            return None
        gw_cmd = [py, "-m", "gateway", "--model", cfg.model_dir, "--coordinator", coord, "--host", cfg.host,
                  "--log-level", cfg.log_level, *cfg.gateway_args, *cache_args, *self._metrics_args(0), *tls]
        keys = {membership.API_KEYS_ENV: "\n".join(cfg.api_keys)} if cfg.api_keys else {}
        if not self._spawn("gateway", gw_cmd, stop, note=f"{cfg.host}:{cfg.port}", env=self._secrets(**keys)):
            return None
        return f"{cfg.host}:{cfg.port}"

    def supervise(self, stop: threading.Event, interval_s: float = 0.1) -> None:
        """Restart children that exit until `stop` is set. Raises GaveUp."""
        while not stop.wait(interval_s):
            self.supervisor.poll()

    def _prepare_run_dir(self) -> None:
        cfg = self.config
        if cfg.run_dir:
            os.makedirs(cfg.run_dir, exist_ok=True)
            self.run_dir = cfg.run_dir
        else:
            self.run_dir, self._own_run_dir = tempfile.mkdtemp(prefix="stagemesh-up-"), True
        self.state_file = cfg.state_file or os.path.join(self.run_dir, STATE_FILE_NAME)
        if not cfg.state_file and os.path.exists(self.state_file):
            os.remove(self.state_file)  # a previous run's plan names workers on ports of that run

    def _secrets(self, **extra: str) -> dict[str, str]:
        """A child's extra environment: the cluster token and `extra` secrets (kept off argv)."""
        return {membership.TOKEN_ENV: self.cluster_token, **extra}

    def _tls_args(self) -> list[str]:
        d = self.config.tls_dir
        if not d:
            return []
        return ["--tls-cert", os.path.join(d, "server.pem"), "--tls-key", os.path.join(d, "server.key"),
                "--tls-ca", os.path.join(d, "ca.pem")]

    def _metrics_args(self, offset: int) -> list[str]:
        base = self.config.metrics_port
        return ["--metrics-port", str(base + offset)] if base else []

    def stop(self, timeout_s: float = 10.0) -> None:
        self.supervisor.stop(timeout_s)
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _spawn(self, name: str, cmd: list[str], stop: threading.Event, env: dict[str, str] | None = None,
               note: str = "") -> bool:
        """Start a supervised child (`env`: extra variables, e.g. secrets kept off argv) and wait
        until it serves. False if `stop` was set first."""
        child = self.supervisor.spawn(name, cmd, env=env, note=note)
        return self.supervisor.wait_ready(child, stop)

