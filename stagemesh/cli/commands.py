"""The `stagemesh` command: up, generate, status, bench, demo-model.

`stagemesh up` and `stagemesh generate --json` are contracts (see DESIGN.md): their flags and
JSON fields stay stable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading

import grpc

from stagemesh import config_cli


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="stagemesh", description="Pipeline-parallel LLM serving over gRPC")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_up(sub)
    _add_generate(sub)
    _add_status(sub)
    _add_bench(sub)
    _add_demo_model(sub)
    _add_certs(sub)
    args = parser.parse_args(argv)
    sys.exit(args.func(args) or 0)


# -- up ------------------------------------------------------------------------------------------
# The flags `up` passes through to a service: that service's own config fields (flag, default and
# help come from there, config_cli); up restates none of them.
def _pass_through() -> dict[str, list[tuple[type, tuple[str, ...]]]]:
    from coordinator.config import CoordinatorConfig
    from gateway.config import GatewayConfig
    from gateway.scheduler import SchedulerConfig
    from stage_worker.config import WorkerConfig

    return {"coordinator": [(CoordinatorConfig, ("plan", "rebalance", "dead_after_s"))],
            "worker": [(WorkerConfig, ("device", "kv_cache_bytes", "kv_blocks", "lease_ttl_s", "quantization",
                                       "kv_cache_dtype", "load_format", "kernel_tuning"))],
            "gateway": [(GatewayConfig, ("port", "http_port", "routing", "routing_weight", "rate_limit_rps",
                                         "rate_limit_burst", "model_id", "max_model_len")),
                        (SchedulerConfig, ("max_batched_tokens", "max_running", "max_waiting", "inflight",
                                           "async_scheduling"))]}


def _add_up(sub) -> None:
    from stagemesh.cli.launcher import MeshConfig

    p = sub.add_parser("up", help="run the whole mesh on this host")
    config_cli.add_flags(p, MeshConfig)
    for service, parts in _pass_through().items():
        for cls, names in parts:
            config_cli.add_flags(p, cls, names, help_suffix=f" [{service}]")
    p.add_argument("--tls-require-client-cert", action="store_true",
                   help="with --tls-dir: the gateway's public port refuses clients without a certificate "
                        "signed by the CA (default: optional)")
    p.add_argument("--api-key", action="append", default=[],
                   help="gateway API key (repeatable; $STAGEMESH_API_KEYS or --api-keys-file keep keys out of "
                        "this command line too)")
    p.add_argument("--api-keys-file", default="", help="file of gateway API keys, one per line")
    p.set_defaults(func=_run_up)


def _mesh_config(args, num_layers: int):
    """up's MeshConfig; each service's pass-through values validated by building its config here,
    so a bad one is one line now rather than a child failing at start again and again."""
    from stagemesh.cli.launcher import MeshConfig

    chosen = vars(args)
    argv: dict[str, list[str]] = {}
    for service, parts in _pass_through().items():
        argv[service] = []
        for cls, names in parts:
            values = config_cli.values(cls, args, names)
            required = {"model_dir": args.model_dir, "coordinator": "up", "num_layers": num_layers,
                        "stages": args.stages}
            fields = {f.name for f in dataclasses.fields(cls)}
            cls(**{k: v for k, v in required.items() if k in fields}, **values)
            argv[service] += config_cli.to_argv(cls, chosen, names)
    return MeshConfig(**config_cli.values(MeshConfig, args), port=args.port,
                      api_keys=_api_keys(args), coordinator_args=argv["coordinator"], worker_args=argv["worker"],
                      gateway_args=[*argv["gateway"], *_gateway_auth_args(args)])


def _run_up(args) -> int:
    from stagemesh.checkpoint import validate_checkpoint
    from stagemesh.cli.launcher import Mesh
    from stagemesh.cli.supervisor import GaveUp
    from stagemesh.errors import CheckpointError
    from stagemesh.model_config import ModelConfig

    try:
        _check_ports_free(args)  # before any child starts: one line, not a child's traceback later
        # --load-format dummy: config.json (and the tokenizer) alone, no weight files to check.
        model = (ModelConfig.from_dir(args.model_dir) if args.load_format == "dummy"
                 else validate_checkpoint(args.model_dir))
        if args.stages > model.num_hidden_layers:
            raise ValueError(f"--stages {args.stages} exceeds the model's {model.num_hidden_layers} layers")
        if args.kv_cache_dtype != "auto" and model.raw.get("kv_lora_rank"):  # as the worker would say, later
            raise ValueError(f"--kv-cache-dtype {args.kv_cache_dtype} is for K/V pools; {model.architecture}'s "
                             "latent (MLA) pool keeps the model's dtype (use --kv-cache-dtype auto)")
        config = _mesh_config(args, model.num_hidden_layers)
        if args.kernel_tuning:  # a bad file: one line now, not each worker failing at start again and again
            from stage_worker.kernels import tuning

            tuning.load(args.kernel_tuning)
        if args.tls_dir:
            from stagemesh.security import dev_tls

            dev_tls(args.tls_dir)  # ValueError naming a missing file now, not in a child
    except (CheckpointError, ValueError) as exc:
        print(f"stagemesh up: {exc}", file=sys.stderr)
        return 2
    _warn_if_exposed(args)
    mesh = Mesh(config)
    # Children are started and restarted from this (main) thread: PR_SET_PDEATHSIG follows the
    # forking thread. A signal only sets the event; the loops below notice it within 0.1 s.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        address = mesh.start(stop)
        if address is None:
            return 0
        print(f"stagemesh ready on {address} (model {args.model_dir}, {args.stages} stage(s), "
              f"{args.replicas} replica(s)) coordinator {mesh.coordinator_address}", flush=True)
        mesh.supervise(stop)
        return 0
    except GaveUp as exc:
        print(f"stagemesh up: {exc}\nstagemesh up: stopping", file=sys.stderr, flush=True)
        return 1
    finally:
        mesh.stop()


def _check_ports_free(args) -> None:
    """ValueError naming the first fixed port of `up` that is taken or not a port at all."""
    import socket

    ports = [("--port", args.port), ("--http-port", args.http_port)]
    if args.metrics_port:  # the layout --metrics-port's help describes
        workers = args.stages * args.replicas + args.spares
        ports += [("--metrics-port", args.metrics_port + k) for k in (0, 1, 2)]
        ports += [("--metrics-port", args.metrics_port + 10 + i) for i in range(workers)]
    host = getattr(args, "host", "127.0.0.1")
    for flag, port in ports:
        if port == 0:
            continue  # off, or (--port) any free port
        if not 0 < port < 65536:
            raise ValueError(f"{flag} {port} is not a port number (1-65535)")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ValueError(f"{flag}: port {port} on {host} is not free ({exc.strerror}); stop what listens "
                                 f"there or choose another port") from None


def _gateway_auth_args(args) -> list[str]:
    """The gateway's auth flags. Not the keys themselves: they go in its environment (_api_keys)."""
    out = ["--api-keys-file", args.api_keys_file] if args.api_keys_file else []
    if args.tls_require_client_cert:
        out.append("--tls-require-client-cert")
    return out


def _api_keys(args) -> tuple[str, ...]:
    from stagemesh.membership import API_KEYS_ENV

    return (*args.api_key, *os.environ.get(API_KEYS_ENV, "").split())


def _warn_if_exposed(args) -> None:
    from stagemesh.membership import is_loopback

    if args.tls_dir or is_loopback(args.host):
        return
    print(f"stagemesh up: warning: --host {args.host} exposes the mesh's ports, internal ones included, without "
          "TLS: the cluster token that guards them, API keys and prompts cross the network in plaintext "
          "(give --tls-dir from `stagemesh certs`)", file=sys.stderr, flush=True)


# -- generate ------------------------------------------------------------------------------------
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="send one prompt and print the completion")
    p.add_argument("--target", default="127.0.0.1:50051")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--n", type=int, default=None, help="samples of the prompt (each seeded from --seed); "
                                                      "--json adds them as `choices`")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--api-key", default="", help="sent as `authorization: Bearer KEY`")
    p.add_argument("--tls-ca", default="", help="verify the gateway's TLS certificate with this CA")
    p.add_argument("--tls-cert", default="", help="client certificate (when the gateway requires one)")
    p.add_argument("--tls-key", default="", help="key of --tls-cert")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from stagemesh.client import Client, Completion, FieldRangeError, build_request

    try:
        ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()] if args.prompt_ids is not None else None
    except ValueError:
        print("stagemesh generate: --prompt-ids takes comma-separated integers, e.g. 1,2,3", file=sys.stderr)
        return 2
    kwargs = dict(prompt=args.prompt, prompt_ids=ids, max_tokens=args.max_tokens, temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
                  n=args.n)
    # Flags that cannot make a request at all are named here; what values mean, the gateway checks.
    try:
        if not 0 < args.timeout < 1e9:  # NaN fails too; gRPC takes an infinite deadline as already past
            raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
        for flag, text in [("--prompt", args.prompt or ""), *(("--stop", s) for s in args.stop)]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{flag} is not valid UTF-8 text") from None
        build_request(**kwargs)
    except FieldRangeError as exc:
        print(f"stagemesh generate: --{exc.field.replace('_', '-')}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"stagemesh generate: {exc}", file=sys.stderr)
        return 2
    out = Completion()
    try:
        from stagemesh.security import TlsConfig

        tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_ca else None
    except ValueError as exc:
        print(f"stagemesh generate: {exc}", file=sys.stderr)
        return 2
    try:
        with Client(args.target, tls=tls, api_key=args.api_key) as client:
            for msg in client.stream(timeout=args.timeout, **kwargs):
                out.add(msg)
                if not args.json and (args.n or 1) == 1:  # several samples: printed whole at the end
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
    except grpc.RpcError as exc:
        if args.json:
            print(json.dumps({"error": {"code": exc.code().name, "message": exc.details()}}))
        else:
            print(f"\nstagemesh generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out.to_json()))
    else:
        for i, sample in enumerate(out.choices):
            print(f"--- sample {i} [{sample.finish_reason}] ---\n{sample.text}")
        print(f"\n[{out.finish_reason}; {out.prompt_tokens} prompt + {out.completion_tokens} completion tokens, "
              f"{out.cached_tokens} cached]", file=sys.stderr)
    return 0


# -- status --------------------------------------------------------------------------------------
def _add_status(sub) -> None:
    p = sub.add_parser("status", help="show the plan, the workers, their load and KV use")
    p.add_argument("--coordinator", default="127.0.0.1:7000",
                   help="HOST:PORT of the coordinator (`stagemesh up` prints it on its ready line)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_status)


def _run_status(args) -> int:
    from stagemesh.cli.status import run

    return run(args.coordinator, args.json, args.timeout)


# -- bench ---------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="drive the mesh with a random workload; print throughput and latencies")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", default="16-64", help="prompt length range a-b, in tokens")
    p.add_argument("--output-len", default="16-32", help="output length range a-b, in tokens (EOS ignored)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    from stagemesh.cli.bench import run

    return run(args)


# -- demo-model ----------------------------------------------------------------------------------
def _add_demo_model(sub) -> None:
    p = sub.add_parser("demo-model", help="write a tiny random Llama checkpoint with a real tokenizer")
    p.add_argument("dir")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_demo_model)


def _run_demo_model(args) -> int:
    from pathlib import Path

    from stagemesh.cli.demo_model import write_demo_model

    if not 1 <= args.layers <= 1024 or not 0 <= args.seed < 2**63:
        print(f"stagemesh demo-model: --layers must be in [1, 1024] and --seed in [0, 2**63), "
              f"got {args.layers} and {args.seed}", file=sys.stderr)
        return 2
    try:
        out = Path(args.dir)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(20, "it is a file, not a directory")
        out.mkdir(parents=True, exist_ok=True)  # fail on a bad path now, before training the tokenizer
        path = write_demo_model(out, num_layers=args.layers, seed=args.seed)
    except OSError as exc:
        print(f"stagemesh demo-model: cannot write a checkpoint to {args.dir}: "
              f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}", file=sys.stderr)
        return 2
    print(f"wrote a demo checkpoint to {path}")
    return 0


# -- certs ---------------------------------------------------------------------------------------
def _add_certs(sub) -> None:
    p = sub.add_parser("certs", help="write a development CA and server/client certificates")
    p.add_argument("dir")
    p.add_argument("--name", action="append", default=[],
                   help="subject alternative name (repeatable; default 127.0.0.1 and localhost)")
    p.add_argument("--days", type=int, default=365)
    p.set_defaults(func=_run_certs)


def _run_certs(args) -> int:
    from stagemesh.security import DEV_NAMES, make_dev_certs

    files = make_dev_certs(args.dir, tuple(args.name) or DEV_NAMES, args.days)
    print(f"wrote a development CA and certificates to {args.dir}: " + ", ".join(p.name for p in files.values()))
    print(f"use: stagemesh up --tls-dir {args.dir} ...  |  stagemesh generate --tls-ca {files['ca.pem']} ...")
    return 0

