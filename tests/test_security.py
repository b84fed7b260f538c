"""Transport security and API keys, on real processes over loopback.

A 2-stage mesh runs with the certificates of `stagemesh certs`: stage workers and cache_service
demand a client certificate (mutual TLS), the gateway's public gRPC and HTTP ports speak TLS with
client certificates optional and demand an API key; one key's rate limit is exhausted on purpose.
The coordinator link is plaintext until coordinator/server.py binds through stagemesh.security.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stagemesh.client import AsyncClient, Client
from stagemesh.security import TlsConfig, dev_tls, make_dev_certs, sync_channel
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from tests.procs import coordinator_cmd, gateway_cmd, new_port, processes, worker_cmd

KEY, KEY2 = "sk-test-one", "sk-test-two"
RPS, BURST = 5, 40


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
    tls = [*_tls_args(certs), "--coordinator-plaintext"]
    cmds = [coordinator_cmd(model_dir, cport, 2)]
    cmds += [[*worker_cmd(model_dir, coord, p, 64), *tls] for p in wports]
    cmds.append(gateway_cmd(model_dir, coord, gport, *tls, "--http-port", str(hport), "--api-key", KEY,
                            "--api-key", KEY2, "--rate-limit-rps", str(RPS), "--rate-limit-burst", str(BURST)))
    with processes(*cmds) as procs:
        yield {"gateway": f"127.0.0.1:{gport}", "http": f"127.0.0.1:{hport}", "procs": procs,
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
                    return exc.code(), exc.details()
            return await asyncio.gather(*(one() for _ in range(BURST + 30)))

    results = asyncio.run(burst())
    limited = [d for code, d in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert limited and "rate limit" in limited[0]
    assert sum(code == grpc.StatusCode.INVALID_ARGUMENT for code, _ in results) >= BURST
    status, body = _http(tls_mesh, certs, "/v1/completions", COMPLETION, api_key=KEY2)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    # Another key has its own bucket.
    with Client(tls_mesh["gateway"], tls=_server_only(certs), api_key=KEY) as c:
        assert len(c.generate(prompt_ids=[5, 6], max_tokens=2, timeout=30).token_ids) == 2


def test_no_process_died(tls_mesh):
    assert all(p.poll() is None for p in tls_mesh["procs"])
