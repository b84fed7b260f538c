"""Transport security, membership and API keys, on real processes over loopback.

A 2-stage mesh runs with the certificates of `stagemesh certs`: the coordinator, stage workers and
cache_service demand a client certificate (mutual TLS) and, for their control rpcs, the member
role that server.pem carries and the users' client.pem does not; the gateway's public gRPC and
HTTP ports speak TLS with client certificates optional and demand an API key; one key's rate
limit is exhausted on purpose, and wrong keys get this peer locked out for a moment.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from google.rpc import error_details_pb2
from grpc_status import rpc_status

from stagemesh.client import AsyncClient, Client
from stagemesh.membership import MEMBER_URI
from stagemesh.security import TlsConfig, dev_tls, make_dev_certs, sync_channel
from stagemesh.v1 import cache_pb2, cache_pb2_grpc
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from stagemesh.cli.harness import coordinator_cmd, gateway_cmd, new_port, processes, worker_cmd

KEY, KEY2 = "sk-test-one", "sk-test-two"
RPS, BURST = 5, 40
MAX_FAILURES, LOCKOUT_S = 5, 2


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    make_dev_certs(d)
    return d


def _tls_args(certs) -> list[str]:
    return ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
            "--tls-ca", str(certs / "ca.pem")]


@pytest.fixture(scope="module")
def tls_mesh(ckpt_dir, certs):
    model_dir = ckpt_dir("llama", num_layers=4)
    cport, gport, hport = new_port(), new_port(), new_port()
    coord = f"127.0.0.1:{cport}"
    wports = [new_port(), new_port()]
    tls = _tls_args(certs)
    cmds = [coordinator_cmd(model_dir, cport, 2, *tls)]
    cmds += [[*worker_cmd(model_dir, coord, p, 64), *tls] for p in wports]
    cmds.append(gateway_cmd(model_dir, coord, gport, *tls, "--http-port", str(hport), "--api-key", KEY,
                            "--api-key", KEY2, "--rate-limit-rps", str(RPS), "--rate-limit-burst", str(BURST),
                            "--auth-max-failures", str(MAX_FAILURES), "--auth-lockout-s", str(LOCKOUT_S)))
    with processes(*cmds) as procs:
        yield {"gateway": f"127.0.0.1:{gport}", "http": f"127.0.0.1:{hport}", "procs": procs, "coordinator": coord,
               "workers": [f"127.0.0.1:{p}" for p in wports]}


def _stats(address: str, tls: TlsConfig | None, creds=None):
    ch = grpc.secure_channel(address, creds) if creds is not None else sync_channel(address, tls)
    with ch:
        return pb_grpc.StageStub(ch).Stats(pb.StatsRequest(), timeout=5)


# -- certificates ---------------------------------------------------------------------------------
def test_certs_command_makes_a_ca_and_certificates_it_signed(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stagemesh.cli", "certs", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in ("server", "client"):
        cert = x509.load_pem_x509_certificate((tmp_path / "c" / f"{role}.pem").read_bytes())
        assert cert.issuer == ca.subject
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in sans.get_values_for_type(x509.DNSName)
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert oct((tmp_path / "c" / f"{role}.key").stat().st_mode & 0o777) == "0o600"
        # The role: server.pem is a mesh member's, client.pem (handed to users) is not.
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == ([MEMBER_URI] if role == "server" else [])


def test_tls_config_names_what_is_missing(tmp_path, certs):
    with pytest.raises(ValueError, match="--tls-ca"):
        TlsConfig(cert=str(certs / "server.pem"), key=str(certs / "server.key"), ca="")
    with pytest.raises(ValueError, match="no such file"):
        TlsConfig(cert=str(tmp_path / "nope.pem"), key=str(certs / "server.key"), ca=str(certs / "ca.pem"))


# -- mutual TLS on internal links -----------------------------------------------------------------
def test_stage_worker_refuses_plaintext_and_certless_clients(tls_mesh, certs):
    worker = tls_mesh["workers"][0]
    with pytest.raises(grpc.RpcError) as err:
        _stats(worker, None)  # plaintext
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    ca_only = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        _stats(worker, None, creds=ca_only)  # TLS, but no client certificate
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_stage_worker_refuses_a_certificate_from_another_ca(tls_mesh, tmp_path, certs):
    make_dev_certs(tmp_path / "other")
    other = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes(),
                                         private_key=(tmp_path / "other" / "client.key").read_bytes(),
                                         certificate_chain=(tmp_path / "other" / "client.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        _stats(tls_mesh["workers"][0], None, creds=other)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_stage_worker_accepts_a_valid_client_certificate(tls_mesh, certs):
    stats = [_stats(w, dev_tls(certs, "client")) for w in tls_mesh["workers"]]
    assert all(s.num_blocks == 64 for s in stats)
    ranges = sorted((s.layer_start, s.layer_end) for s in stats)  # the planner picks the split
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == 4


def test_cache_service_demands_a_client_certificate(certs):
    port = new_port()
    cmd = [sys.executable, "-m", "cache_service", "--port", str(port), *_tls_args(certs)]
    with processes(cmd):
        target = f"127.0.0.1:{port}"
        with sync_channel(target, dev_tls(certs, "client")) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        for ch in (grpc.insecure_channel(target),
                   grpc.secure_channel(target, grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes()))):
            with ch, pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # Its index is for members: the users' client certificate is refused, server.pem passes
        # (then Redis, absent here or not, decides the answer).
        clear = cache_pb2.ClearReplicaRequest(replica_id="r0")
        with sync_channel(target, dev_tls(certs, "client")) as ch, pytest.raises(grpc.RpcError) as err:
            cache_pb2_grpc.CacheIndexStub(ch).ClearReplica(clear, timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not a mesh member" in err.value.details()
        with sync_channel(target, dev_tls(certs, "server")) as ch:
            try:
                cache_pb2_grpc.CacheIndexStub(ch).ClearReplica(clear, timeout=5)
            except grpc.RpcError as exc:
                assert exc.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), \
                    exc.details()


# -- roles: a client certificate opens the public API only -----------------------------------------
def _control_calls(tls_mesh):
    worker, coord = tls_mesh["workers"][0], tls_mesh["coordinator"]
    return [
        ("SetSlowdown", worker, lambda ch: pb_grpc.StageStub(ch).SetSlowdown(pb.SetSlowdownRequest(factor=100.0),
                                                                             timeout=5)),
        ("Release", worker, lambda ch: pb_grpc.StageStub(ch).Release(pb.ReleaseRequest(lease_id="x"), timeout=5)),
        ("Forward", worker, lambda ch: pb_grpc.StageStub(ch).Forward(pb.ForwardRequest(lease_id="x"), timeout=5)),
        ("ReportFailure", coord, lambda ch: pb_grpc.CoordinatorStub(ch).ReportFailure(
            pb.ReportFailureRequest(replica=0, epoch=10**6), timeout=5)),
        ("Register", coord, lambda ch: pb_grpc.CoordinatorStub(ch).Register(
            pb.RegisterRequest(address="127.0.0.1:1", device="cpu", memory_bytes=1 << 30), timeout=5)),
        ("Heartbeat", coord, lambda ch: pb_grpc.CoordinatorStub(ch).Heartbeat(
            pb.HeartbeatRequest(worker_id="nobody"), timeout=5)),
    ]


def test_client_certificate_cannot_call_stage_or_coordinator_but_can_generate(tls_mesh, certs):
    for name, target, call in _control_calls(tls_mesh):
        with sync_channel(target, dev_tls(certs, "client")) as ch, pytest.raises(grpc.RpcError) as err:
            call(ch)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err.value.details())
        assert "not a mesh member" in err.value.details(), name
    # A member certificate passes the same gate (these two calls change nothing: no such lease,
    # a stale epoch).
    for name, target, call in _control_calls(tls_mesh):
        if name in ("Release", "ReportFailure"):
            with sync_channel(target, dev_tls(certs, "server")) as ch:
                call(ch)
    with Client(tls_mesh["gateway"], tls=dev_tls(certs, "client"), api_key=KEY) as c:
        assert len(c.generate(prompt_ids=[5, 6, 7], max_tokens=3, timeout=30).token_ids) == 3


# -- the gateway's public port: TLS + API keys ----------------------------------------------------
def _server_only(certs) -> TlsConfig:
    return TlsConfig(cert="", key="", ca=str(certs / "ca.pem"))


def test_gateway_speaks_tls_with_client_certificates_optional(tls_mesh, certs):
    with Client(tls_mesh["gateway"], tls=_server_only(certs), api_key=KEY) as c:
        out = c.generate(prompt_ids=[5, 6, 7], max_tokens=3, timeout=30)
    assert len(out.token_ids) == 3
    with Client(tls_mesh["gateway"], tls=dev_tls(certs, "client"), api_key=KEY) as c:
        assert len(c.generate(prompt_ids=[5, 6], max_tokens=2, timeout=30).token_ids) == 2
    with Client(tls_mesh["gateway"], api_key=KEY) as c, pytest.raises(grpc.RpcError) as err:
        c.generate(prompt_ids=[5, 6], max_tokens=2, timeout=10)  # plaintext
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("api_key,words", [("", "missing API key"), ("sk-wrong", "invalid API key")])
def test_grpc_api_key_required(tls_mesh, certs, api_key, words):
    with Client(tls_mesh["gateway"], tls=_server_only(certs), api_key=api_key) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate(prompt_ids=[5, 6], max_tokens=2, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and words in err.value.details()
    with sync_channel(tls_mesh["gateway"], _server_only(certs)) as ch:  # health stays open for probes
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def _http(tls_mesh, certs, path: str, body: dict | None, api_key: str = ""):
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"https://{tls_mesh['http']}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


COMPLETION = {"model": "", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}


def test_http_api_key_required_accepted_rejected(tls_mesh, certs):
    status, body = _http(tls_mesh, certs, "/v1/completions", COMPLETION)
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and "missing" in body["error"]["message"]
    status, body = _http(tls_mesh, certs, "/v1/completions", COMPLETION, api_key="sk-wrong")
    assert status == 401 and body["error"]["type"] == "invalid_request_error"
    status, body = _http(tls_mesh, certs, "/v1/models", None, api_key=KEY)
    assert status == 200
    status, body = _http(tls_mesh, certs, "/v1/completions", {**COMPLETION, "model": body["data"][0]["id"]},
                         api_key=KEY)
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_rate_limit_answers_resource_exhausted_per_key(tls_mesh, certs):
    async def burst() -> list[grpc.StatusCode]:
        async with AsyncClient(tls_mesh["gateway"], tls=_server_only(certs), api_key=KEY2) as c:
            async def one():
                try:  # max_tokens=0 is refused after the rate check: cheap, and still spends a token
                    await c.generate(prompt_ids=[5], max_tokens=0, timeout=20)
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc)
                    return exc.code(), exc.details()
            return await asyncio.gather(*(one() for _ in range(BURST + 30)))

    errors: list[grpc.aio.AioRpcError] = []
    results = asyncio.run(burst())
    limited = [d for code, d in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert limited and "rate limit" in limited[0]
    # The retry delay is machine-readable: google.rpc.RetryInfo in grpc-status-details-bin.
    delays = [_retry_delay_s(e) for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(delays) == len(limited) and all(0 < d <= 1 / RPS + 1e-6 for d in delays), delays
    assert sum(code == grpc.StatusCode.INVALID_ARGUMENT for code, _ in results) >= BURST
    status, body = _http(tls_mesh, certs, "/v1/completions", COMPLETION, api_key=KEY2)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    # Another key has its own bucket.
    with Client(tls_mesh["gateway"], tls=_server_only(certs), api_key=KEY) as c:
        assert len(c.generate(prompt_ids=[5, 6], max_tokens=2, timeout=30).token_ids) == 2


def _retry_delay_s(exc) -> float:
    status = rpc_status.from_call(exc)
    assert status is not None, f"no grpc-status-details-bin in {exc.trailing_metadata()}"
    infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.RetryInfo()
    infos[0].Unpack(info)
    return info.retry_delay.ToNanoseconds() / 1e9


def test_wrong_api_keys_lock_this_peer_out_for_a_while(tls_mesh, certs):
    tls = _server_only(certs)
    refusals = []
    with Client(tls_mesh["gateway"], tls=tls, api_key="sk-guess") as c:
        for _ in range(MAX_FAILURES + 1):
            with pytest.raises(grpc.RpcError) as err:
                c.generate(prompt_ids=[5], max_tokens=1, timeout=10)
            refusals.append(err.value)
            if "too many wrong API keys" in err.value.details():
                break
    assert all(e.code() == grpc.StatusCode.UNAUTHENTICATED for e in refusals)
    assert refusals[0].details() == "invalid API key"  # earlier tests sent fewer than MAX_FAILURES
    assert "too many wrong API keys" in refusals[-1].details(), [e.details() for e in refusals]
    assert 0 < _retry_delay_s(refusals[-1]) <= LOCKOUT_S
    # While locked out, even the right key is refused from this peer (answering it would tell a
    # guesser which guess was right), on HTTP too, with Retry-After.
    with Client(tls_mesh["gateway"], tls=tls, api_key=KEY) as c, pytest.raises(grpc.RpcError) as err:
        c.generate(prompt_ids=[5], max_tokens=1, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "too many" in err.value.details()
    req = urllib.request.Request(f"https://{tls_mesh['http']}/v1/models", headers={"authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(certs / "ca.pem")), timeout=30)
    assert http_err.value.code == 429 and 1 <= int(http_err.value.headers["retry-after"]) <= LOCKOUT_S
    # The lockout ends by itself.
    deadline = time.monotonic() + LOCKOUT_S + 30
    while True:
        try:
            with Client(tls_mesh["gateway"], tls=tls, api_key=KEY) as c:
                assert len(c.generate(prompt_ids=[5, 6], max_tokens=2, timeout=30).token_ids) == 2
            break
        except grpc.RpcError as exc:
            assert "too many" in exc.details() and time.monotonic() < deadline, exc.details()
            time.sleep(0.2)


def test_no_process_died(tls_mesh):
    assert all(p.poll() is None for p in tls_mesh["procs"])
