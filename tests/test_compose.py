"""compose/: the Compose files validate, and their deployment invariants hold.

Validation uses the real Compose CLI when this machine has one (`docker compose`, else
`docker-compose`, e.g. Debian's package): its `config` interpolates, merges anchors, checks the file
against the Compose schema and prints the resolved model, on which the invariants below are then
asserted. Without a CLI, the files are parsed with PyYAML (merge keys resolved, `${VAR:-default}`
and `${VAR:?msg}` interpolated here) and the same invariants run on that.

`stagemesh.healthcheck` itself is tested in test_healthcheck.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
SINGLE = COMPOSE / "docker-compose.yml"
HOST_WORKER = COMPOSE / "host-worker.yml"
ALL_PROFILES = ("gpus4", "gpus8", "consul")
ENV = {"MODEL_DIR": "/srv/models/m", "STAGES": "8", "REPLICAS": "1", "STAGEMESH_CLUSTER_TOKEN": "t0ken"}
MULTI_ENV = {"MODEL_DIR": "/srv/models/m", "HOST_IP": "10.0.0.6", "HEAD_IP": "10.0.0.5",
             "STAGEMESH_CLUSTER_TOKEN": "t0ken"}

STAGEMESH_SERVICES = {"coordinator", "cache_service", "gateway"}  # plus worker<i>
GRPC_PORT = {"gateway": 50051, "coordinator": 7000, "cache_service": 7100}
METRICS_PORT = {"gateway": 9100, "coordinator": 9101, "cache_service": 9102}
METRICS = {
    "histograms": ["stagemesh_ttft_seconds", "stagemesh_itl_seconds", "stagemesh_e2e_seconds",
                   "stagemesh_stage_step_seconds", "stagemesh_hop_seconds",
                   "stagemesh_step_turnaround_seconds"],
    "others": ["stagemesh_queue_depth", "stagemesh_running_sequences", "stagemesh_kv_blocks_used",
               "stagemesh_kv_blocks_free", "stagemesh_prefix_hit_tokens_total",
               "stagemesh_prompt_tokens_total", "stagemesh_rebalances_total", "stagemesh_replays_total"],
}
# Flags that compose passes but that a service may not parse yet. Every other flag in a compose
# command must be one the service's argparse accepts today.
PENDING_FLAGS: set[str] = set()


# --- the Compose CLI, or the fallback ------------------------------------------------------------

def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return cmd
    return None


CLI = _compose_cli()
_VAR = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def _interpolate(value, env: dict[str, str]):
    """Compose-style `${VAR}`, `${VAR:-default}`, `${VAR:?message}` over a parsed document."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.groups()
        if env.get(name):
            return env[name]
        if op == "?":
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        return arg if op == "-" else ""

    return _VAR.sub(sub, value)


def _env_file(tmp_path: Path) -> Path:
    # An empty env file keeps a developer's compose/.env out of the test.
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


def compose_config(path: Path, env: dict[str, str], tmp_path: Path,
                   profiles: tuple[str, ...] = ALL_PROFILES) -> dict:
    """The resolved Compose model of `path` under `env` (CLI `config`, else PyYAML + interpolation)."""
    if CLI is None:
        return _interpolate(yaml.safe_load(path.read_text()), env)
    args = [*CLI, "--env-file", str(_env_file(tmp_path)), "-f", str(path)]
    for p in profiles:
        args += ["--profile", p]
    run_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **env}
    proc = subprocess.run([*args, "config"], capture_output=True, text=True, env=run_env, timeout=120)
    assert proc.returncode == 0, f"{' '.join(args)} config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def _services(cfg: dict) -> dict[str, dict]:
    return cfg["services"]


def _active(cfg: dict, profiles: tuple[str, ...]) -> dict[str, dict]:
    """The services `up` starts with these profiles on (Compose v1's `config` lists them all)."""
    return {name: svc for name, svc in _services(cfg).items()
            if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)}


def _workers(cfg: dict) -> dict[int, dict]:
    out = {}
    for name, svc in _services(cfg).items():
        m = re.fullmatch(r"worker(\d+)", name)
        if m:
            out[int(m.group(1))] = svc
    return dict(sorted(out.items()))


def _command(svc: dict) -> list[str]:
    cmd = svc.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _flags(svc: dict) -> dict[str, str]:
    """--name=value flags of a stagemesh command (compose writes every flag in that form)."""
    out = {}
    for arg in _command(svc):
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            out[name] = value
    return out


def _healthcheck_test(svc: dict) -> list[str]:
    test = svc["healthcheck"]["test"]
    return test if isinstance(test, list) else ["CMD-SHELL", test]


def _volume_mounts(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each mount, from short or long syntax."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append((v.get("source"), v["target"], bool(v.get("read_only"))))
    return out


def _published(svc: dict) -> list[tuple[str, int, str]]:
    """(host_ip, published port, protocol) of each published port, from short or long syntax."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            if p.get("published") is not None:
                out.append((p.get("host_ip", ""), int(p["published"]), p.get("protocol", "tcp")))
            continue
        spec, _, proto = str(p).partition("/")
        parts = spec.split(":")
        if len(parts) >= 2:
            out.append((parts[0] if len(parts) == 3 else "", int(parts[-2]), proto or "tcp"))
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return compose_config(SINGLE, ENV, tmp_path_factory.mktemp("c1"))


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> dict:
    return compose_config(HOST_WORKER, MULTI_ENV, tmp_path_factory.mktemp("c2"))


# --- validation by the Compose CLI ---------------------------------------------------------------

def _assert_refused_without(var: str, path: Path, env: dict[str, str], tmp_path: Path) -> None:
    """The file refuses to resolve when `var` is unset, and says which variable is missing."""
    missing = {k: v for k, v in env.items() if k != var}
    if CLI is None:
        with pytest.raises(ValueError, match=var):
            _interpolate(yaml.safe_load(path.read_text()), missing)
        return
    args = [*CLI, "--env-file", str(_env_file(tmp_path)), "-f", str(path), "config"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), **missing})
    assert proc.returncode != 0 and var in proc.stderr, proc.stderr


def test_compose_files_validate_and_require_model_dir(tmp_path):
    # Both files resolve (the fixtures' path), and each refuses to start without a checkpoint dir.
    for path, env in ((SINGLE, ENV), (HOST_WORKER, MULTI_ENV)):
        cfg = compose_config(path, env, tmp_path)
        assert cfg["services"], path
        _assert_refused_without("MODEL_DIR", path, env, tmp_path)


def test_every_stagemesh_service_gets_the_cluster_token_and_none_starts_without_it(tmp_path, single, multi):
    # Internal calls are members-only (stagemesh/membership.py): without TLS every stagemesh process
    # must hold the same token, from the environment (never argv), or the mesh refuses its own calls.
    for cfg in (single, multi):
        for name, svc in cfg["services"].items():
            if "stagemesh" not in str(svc.get("image", "")):
                continue
            env = svc.get("environment") or {}
            if isinstance(env, list):
                env = dict(e.split("=", 1) for e in env)
            assert env.get("STAGEMESH_CLUSTER_TOKEN") == "t0ken", name
            assert not any("t0ken" in str(a) for a in svc.get("command") or []), name
    for path, env in ((SINGLE, ENV), (HOST_WORKER, MULTI_ENV)):
        _assert_refused_without("STAGEMESH_CLUSTER_TOKEN", path, env, tmp_path)


def test_multihost_requires_head_and_host_addresses(tmp_path):
    for var in ("HEAD_IP", "HOST_IP"):
        _assert_refused_without(var, HOST_WORKER, MULTI_ENV, tmp_path)


# --- single host ---------------------------------------------------------------------------------

def test_every_service_has_healthcheck_and_restart_policy(single, multi):
    for cfg in (single, multi):
        for name, svc in _services(cfg).items():
            assert svc.get("restart") in {"always", "unless-stopped", "on-failure"}, name
            assert "healthcheck" in svc and not svc["healthcheck"].get("disable"), name
            assert _healthcheck_test(svc)[0] in {"CMD", "CMD-SHELL"}, name


def test_expected_services_exist(single):
    names = set(_services(single))
    assert {"redis", "consul", "coordinator", "cache_service", "gateway", "prometheus", "grafana"} <= names
    assert sorted(_workers(single)) == list(range(8))


def test_stagemesh_services_probe_their_own_grpc_port(single, multi):
    for cfg in (single, multi):
        for name, svc in _services(cfg).items():
            if name not in STAGEMESH_SERVICES and not name.startswith("worker"):
                continue
            port = _flags(svc)["--port"]
            assert _healthcheck_test(svc)[1:] == ["python", "-m", "stagemesh.healthcheck", f"127.0.0.1:{port}"], name
            assert _flags(svc)["--host"] == "0.0.0.0", name
    for name, port in GRPC_PORT.items():
        assert _flags(_services(single)[name])["--port"] == str(port)


def test_one_worker_per_gpu_pinned_by_device_id(single, multi):
    for cfg in (single, multi):
        workers = _workers(cfg)
        device_ids = []
        for i, svc in workers.items():
            devices = svc["deploy"]["resources"]["reservations"]["devices"]
            assert len(devices) == 1, f"worker{i}"
            dev = devices[0]
            assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], f"worker{i}"
            assert dev["device_ids"] == [str(i)], f"worker{i} must own GPU {i} alone"
            assert "count" not in dev, f"worker{i}: count and device_ids exclude each other"
            device_ids += dev["device_ids"]
            # The container sees only its GPU, as cuda:0.
            flags = _flags(svc)
            assert flags["--device"] == "cuda:0", f"worker{i}"
            assert flags["--port"] == str(7200 + i) and flags["--metrics-port"] == str(9110 + i), f"worker{i}"
        assert len(device_ids) == len(set(device_ids)) == len(workers) == 8


def test_workers_advertise_reachable_addresses(single, multi):
    for i, svc in _workers(single).items():
        flags = _flags(svc)
        assert flags["--advertise"] == f"worker{i}:{7200 + i}"  # compose DNS name on one host
        assert flags["--coordinator"] == "coordinator:7000"
    for i, svc in _workers(multi).items():
        flags = _flags(svc)
        assert flags["--advertise"] == f"{MULTI_ENV['HOST_IP']}:{7200 + i}"
        assert flags["--coordinator"] == f"{MULTI_ENV['HEAD_IP']}:7000"
        assert svc["network_mode"] == "host"


def test_head_host_publishes_what_other_hosts_reach(tmp_path):
    # With HOST_IP set (head of a multi-host mesh), workers advertise and publish on HOST_IP.
    cfg = compose_config(SINGLE, {**ENV, "HOST_IP": "10.0.0.5"}, tmp_path)
    for i, svc in _workers(cfg).items():
        assert _flags(svc)["--advertise"] == f"10.0.0.5:{7200 + i}"
        assert ("10.0.0.5", 7200 + i, "tcp") in _published(svc)
    assert ("10.0.0.5", 7000, "tcp") in _published(_services(cfg)["coordinator"])
    consul = _services(cfg)["consul"]
    assert "-advertise=10.0.0.5" in _command(consul)
    assert {("10.0.0.5", 8300, "tcp"), ("10.0.0.5", 8301, "tcp"), ("10.0.0.5", 8301, "udp")} <= set(_published(consul))


def test_ports_are_unique(single):
    published, grpc_ports, metrics_ports = [], [], []
    for name, svc in _services(single).items():
        published += _published(svc)
        flags = _flags(svc)
        if "--port" in flags:
            grpc_ports.append(int(flags["--port"]))
        if "--http-port" in flags:
            grpc_ports.append(int(flags["--http-port"]))
        if "--metrics-port" in flags:
            metrics_ports.append(int(flags["--metrics-port"]))
    host_ports = [(port, proto) for _, port, proto in published]
    assert len(host_ports) == len(set(host_ports)), sorted(host_ports)
    all_ports = grpc_ports + metrics_ports
    assert len(all_ports) == len(set(all_ports)), sorted(all_ports)
    for name, port in METRICS_PORT.items():
        assert _flags(_services(single)[name])["--metrics-port"] == str(port)


def test_depends_on_exists_and_is_acyclic(single, multi):
    for cfg in (single, multi):
        services = _services(cfg)
        graph = {}
        for name, svc in services.items():
            deps = svc.get("depends_on") or {}
            deps = list(deps) if isinstance(deps, (dict, list)) else []
            for dep in deps:
                assert dep in services, f"{name} depends on unknown service {dep}"
            graph[name] = deps
        seen, done = set(), set()

        def visit(n, path=()):
            assert n not in path, f"dependency cycle: {' -> '.join((*path, n))}"
            if n in done:
                return
            for d in graph[n]:
                visit(d, (*path, n))
            done.add(n)

        for n in graph:
            visit(n)
    # Start order that matters: workers and gateway wait for a healthy coordinator.
    services = _services(single)
    for name in ["gateway", *(f"worker{i}" for i in _workers(single))]:
        assert services[name]["depends_on"]["coordinator"]["condition"] == "service_healthy", name
    assert services["cache_service"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_default_up_starts_no_consul_and_every_dependency(tmp_path):
    for path, env in ((SINGLE, ENV), (HOST_WORKER, MULTI_ENV)):
        for profiles in ((), ("gpus4",), ALL_PROFILES):
            active = _active(compose_config(path, env, tmp_path, profiles), profiles)
            if path == SINGLE and not profiles:
                assert {"redis", "coordinator", "cache_service", "gateway", "prometheus", "grafana"} <= set(active)
            assert ("consul" in profiles) == bool({"consul", "consul-agent"} & set(active)), (path.name, profiles)
            for name, svc in active.items():
                for dep in svc.get("depends_on") or {}:
                    assert dep in active, f"{path.name} {profiles}: {name} depends on {dep}, which does not run"
            workers = sorted(n for n in active if n.startswith("worker"))
            expect = 8 if "gpus8" in profiles else 4 if "gpus4" in profiles else 2
            assert workers == [f"worker{i}" for i in range(expect)], (path.name, profiles)


def test_coordinator_keeps_its_plan_on_a_named_volume(single):
    coordinator = _services(single)["coordinator"]
    state = Path(_flags(coordinator)["--state-file"])
    mounts = [m for m in _volume_mounts(coordinator) if state.is_relative_to(m[1])]
    assert len(mounts) == 1, _volume_mounts(coordinator)
    source, target, read_only = mounts[0]
    assert source in single["volumes"] and not read_only, mounts  # named (survives the container), writable
    assert state != Path(target), "the state file is a file inside the volume, not the mount point"
    # The unprivileged user of the image owns that directory, so a new volume is writable by it.
    docker = (COMPOSE / "Dockerfile").read_text()
    assert re.search(rf"chown stagemesh:stagemesh {re.escape(target)}\b", docker), target


def test_gateway_serves_the_configured_model_name(tmp_path):
    default = compose_config(SINGLE, ENV, tmp_path)
    assert _flags(_services(default)["gateway"])["--served-model-name"] == "model"
    named = compose_config(SINGLE, {**ENV, "STAGEMESH_MODEL_NAME": "llama-3-8b"}, tmp_path)
    assert _flags(_services(named)["gateway"])["--served-model-name"] == "llama-3-8b"


def test_checkpoint_volume_is_mounted_read_only(single, multi):
    for cfg in (single, multi):
        vol = cfg["volumes"]["checkpoint"]
        assert vol["driver_opts"]["device"] == ENV["MODEL_DIR"]
        for name, svc in _services(cfg).items():
            if name not in {"coordinator", "gateway"} and not name.startswith("worker"):
                continue
            mounts = [m for m in _volume_mounts(svc) if m[1] == "/models/m"]
            assert mounts == [("checkpoint", "/models/m", True)], name
            assert _flags(svc)["--model"] == "/models/m", name


def test_consul_cluster_is_joined_by_every_host(single, multi):
    server = _command(_services(single)["consul"])
    assert "-server" in server and "-bootstrap-expect=1" in server
    agent = _services(multi)["consul-agent"]
    cmd = _command(agent)
    assert "-server" not in cmd
    assert f"-retry-join={MULTI_ENV['HEAD_IP']}" in cmd
    assert f"-advertise={MULTI_ENV['HOST_IP']}" in cmd and agent["network_mode"] == "host"
    # Consul is opt-in: only the consul profile runs it, and no stagemesh service waits for it
    # (Compose refuses to start a service whose dependency its profiles leave out).
    assert _services(single)["consul"]["profiles"] == ["consul"]
    assert agent["profiles"] == ["consul"]


def test_services_accept_every_flag_compose_passes(single, multi):
    # A flag a service rejects crash-loops its container; ask each module's argparse.
    accepted: dict[str, set[str]] = {}
    for cfg in (single, multi):
        for name, svc in _services(cfg).items():
            cmd = _command(svc)
            if cmd[:2] != ["python", "-m"]:
                continue
            module = cmd[2]
            if module not in accepted:
                out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                                     text=True, timeout=120, cwd=ROOT)
                assert out.returncode == 0, out.stderr
                accepted[module] = set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))
            unknown = set(_flags(svc)) - accepted[module] - PENDING_FLAGS
            assert not unknown, f"{name}: python -m {module} does not accept {sorted(unknown)}"


# --- image ---------------------------------------------------------------------------------------

def test_dockerfile_installs_every_package_on_a_cuda_pytorch_base(single):
    text = (COMPOSE / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M).group(1)
    # A devel base: Triton needs a C compiler at a kernel's first launch, which runtime images lack.
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(torch)}-cuda1\d\.\d+-cudnn9-devel", base), base
    assert re.search(r"apt-get install [^\n]*build-essential", text)
    # torch is pinned to the version the GPU results were measured with, and pip is held to it.
    measured = re.findall(r"^## Results.*PyTorch (\d+\.\d+)", (ROOT / "benchmarks/README_gpu.md").read_text(), re.M)
    assert measured and torch.startswith(measured[-1] + "."), (torch, measured)
    assert 'pip install --no-build-isolation . "torch==${TORCH_VERSION}"' in text
    assert "assert v == '${TORCH_VERSION}'" in text
    # Every package that pyproject installs is copied into the image and not excluded by the
    # Dockerfile's own .dockerignore (compose/Dockerfile.dockerignore, BuildKit).
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text().split()
    for pattern in include:
        pkg = pattern.rstrip("*")
        assert re.search(rf"^COPY {pkg} \./{pkg}$", text, re.M), f"Dockerfile does not copy {pkg}/"
        assert f"!{pkg}/**" in ignore, f"Dockerfile.dockerignore excludes {pkg}/"
    for name, svc in _services(single).items():
        if "build" in svc:
            build = svc["build"]
            context = Path(build["context"]) if Path(build["context"]).is_absolute() else COMPOSE / build["context"]
            assert (context.resolve() / build["dockerfile"]).resolve() == (COMPOSE / "Dockerfile").resolve(), name


# --- Prometheus and Grafana ----------------------------------------------------------------------

def test_prometheus_scrapes_every_metrics_port(single):
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for name, svc in _services(single).items():
        port = _flags(svc).get("--metrics-port")
        if name in STAGEMESH_SERVICES or name.startswith("worker"):
            assert port, f"{name} has no --metrics-port"
            assert f"{name}:{port}" in targets, f"prometheus.yml does not scrape {name}:{port}"
    mounts = {t: s for s, t, _ in _volume_mounts(_services(single)["prometheus"])}
    assert mounts["/etc/prometheus/prometheus.yml"].endswith("prometheus.yml")


def test_prometheus_config_has_scrape_jobs():
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    assert prom["global"]["scrape_interval"]
    assert all(job["job_name"] for job in prom["scrape_configs"])


def test_prometheus_config_passes_promtool():
    """Prometheus' own parser (promtool, Debian's `prometheus` package; scripts/test.sh installs it
    and sets STAGEMESH_REQUIRE_PROMTOOL=1, so there a missing promtool fails instead of skipping)."""
    if not shutil.which("promtool"):
        if os.environ.get("STAGEMESH_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool not installed (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    out = subprocess.run(["promtool", "check", "config", "--syntax-only", str(COMPOSE / "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _dashboard_exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_references_every_metric():
    dash = json.loads((COMPOSE / "grafana" / "stagemesh-dashboard.json").read_text())
    exprs = _dashboard_exprs(dash)
    text = "\n".join(exprs)
    for metric in METRICS["histograms"]:
        assert re.search(rf"histogram_quantile\([0-9.]+, sum by \(le[^)]*\) \(rate\({metric}_bucket\[", text), metric
    for metric in METRICS["others"]:
        assert re.search(rf"\b{metric}\b", text), metric
    assert re.search(r"histogram_quantile\([^,]+, sum by \(le, stage\) \(rate\(stagemesh_stage_step_seconds_bucket", text)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for expr in exprs:  # balanced brackets: a cheap PromQL sanity check
        for o, c in ("()", "[]", "{}"):
            assert expr.count(o) == expr.count(c), expr


def test_grafana_provisioning_matches_compose_mounts(single):
    ds = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    dash = json.loads((COMPOSE / "grafana" / "stagemesh-dashboard.json").read_text())
    var = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert ds["type"] == var["query"] == "prometheus" and ds["uid"] == var["current"]["value"]
    assert ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/stagemesh.yml").read_text())["providers"][0]
    mounts = {t: s for s, t, _ in _volume_mounts(_services(single)["grafana"])}
    assert mounts["/etc/grafana/provisioning"].endswith("grafana/provisioning")
    dash_target = f"{provider['options']['path']}/stagemesh-dashboard.json"
    assert mounts[dash_target].endswith("grafana/stagemesh-dashboard.json")


def test_env_example_covers_every_variable():
    example = dict(line.split("=", 1) for line in (COMPOSE / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for path in (SINGLE, HOST_WORKER):
        for name, _, _ in _VAR.findall(path.read_text()):
            assert name in example, f"{name} (used by {path.name}) missing from .env.example"
