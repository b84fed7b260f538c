"""stagemesh.config_cli: flags built from config dataclasses, and `up` handing them on unchanged."""

import argparse
import dataclasses

import pytest

from coordinator.config import CoordinatorConfig
from gateway.config import GatewayConfig
from gateway.scheduler import SchedulerConfig
from stage_worker.config import WorkerConfig
from stagemesh import config_cli
from stagemesh.cli.commands import _pass_through
from stagemesh.cli.launcher import MeshConfig


def _parser(cls) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    config_cli.add_flags(p, cls)
    return p


@pytest.mark.parametrize("cls", [CoordinatorConfig, GatewayConfig, SchedulerConfig, WorkerConfig, MeshConfig])
def test_parsed_defaults_are_the_config_defaults(cls):
    required = [f for f in config_cli.knobs(cls) if f.default is dataclasses.MISSING]
    argv = [a for f in required for a in (config_cli.flag_of(f), "x")]
    got = config_cli.values(cls, _parser(cls).parse_args(argv))
    for f in config_cli.knobs(cls):
        if f.default is not dataclasses.MISSING:
            assert got[f.name] == f.default, f.name


def test_to_argv_round_trips_every_kind_of_knob():
    chosen = {"split": (3, 2, 1), "rebalance": False, "plan": "uniform", "dead_after_s": 2.5, "stages": 3}
    argv = config_cli.to_argv(CoordinatorConfig, chosen)
    assert argv == ["--stages", "3", "--dead-after-s", "2.5", "--plan", "uniform", "--split", "3,2,1",
                    "--no-rebalance"]
    back = config_cli.from_args(CoordinatorConfig, _parser(CoordinatorConfig).parse_args(argv), num_layers=6)
    assert {k: getattr(back, k) for k in chosen} == chosen
    keys = config_cli.to_argv(GatewayConfig, {"api_keys": ("a", "b")})
    assert config_cli.values(GatewayConfig, _parser(GatewayConfig).parse_args(["--model", "m", *keys]))["api_keys"] \
        == ("a", "b")


def test_up_passes_each_service_its_own_flags_with_its_values():
    """What `up` accepts for a service is that service's knob (same flag, default, help), and the
    argv it hands on parses back, in the service's own parser, to the value given to up."""
    up = argparse.ArgumentParser()
    services = _pass_through()
    for parts in services.values():
        for cls, names in parts:
            config_cli.add_flags(up, cls, names)
    given = ["--max-running", "7", "--routing-weight", "3.5", "--no-rebalance", "--lease-ttl-s", "9",
             "--async-scheduling", "off", "--kv-blocks", "64"]
    args = up.parse_args(given)
    for parts in services.values():
        for cls, names in parts:
            argv = config_cli.to_argv(cls, vars(args), names)
            required = [a for f in config_cli.knobs(cls) if f.default is dataclasses.MISSING
                        for a in (config_cli.flag_of(f), "x")]
            back = config_cli.values(cls, _parser(cls).parse_args([*required, *argv]), names)
            assert back == {n: getattr(args, n) for n in names}
    assert (args.max_running, args.routing_weight, args.rebalance, args.lease_ttl_s) == (7, 3.5, False, 9.0)


def test_worker_threads_follow_the_device_and_the_workers_sharing_the_host(monkeypatch):
    from stage_worker.__main__ import intra_op_threads

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    cfg = WorkerConfig(model_dir="m", device="cpu")
    assert intra_op_threads(cfg) == 16
    assert intra_op_threads(dataclasses.replace(cfg, cpu_share=3)) == 5
    assert intra_op_threads(dataclasses.replace(cfg, cpu_share=32)) == 1
    assert intra_op_threads(dataclasses.replace(cfg, device="cuda:0", cpu_share=3)) == 1
    assert intra_op_threads(dataclasses.replace(cfg, threads=7, cpu_share=3)) == 7
