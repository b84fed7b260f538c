"""ApiKeyAuth's wrong-key throttle and the membership checks, as plain Python (a fake clock).

The same logic runs behind real gRPC and HTTP in tests/test_security.py and test_membership.py;
here its edges: who is counted, when the window and the lockout end, how memory is bounded.
"""

from __future__ import annotations

import grpc
import pytest

from gateway.auth import ApiKeyAuth, FailureThrottle, Throttled, peer_of, retry_info_metadata
from stagemesh.errors import Unauthenticated
from stagemesh.membership import (MEMBER_URI, TOKEN_ENV, TOKEN_FILE_ENV, TOKEN_HEADER, _Refused, check_member_cert,
                                  check_token, cluster_token, is_guarded, redact_url)

KEY = "sk-right"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _auth(clock, **kw):
    return ApiKeyAuth([KEY], clock=clock, max_failures=3, failure_window_s=60, lockout_s=30, **kw)


def _refusal(auth, authorization, peer="10.0.0.1"):
    with pytest.raises(Unauthenticated) as err:
        auth.check(authorization, peer=peer)
    return err.value


def test_wrong_keys_lock_the_peer_out_then_it_lifts():
    clock = Clock()
    auth = _auth(clock)
    for _ in range(3):
        assert str(_refusal(auth, "Bearer sk-guess")) == "invalid API key"
    locked = _refusal(auth, f"Bearer {KEY}")  # the right key too: the lockout says nothing about keys
    assert isinstance(locked, Throttled) and locked.retry_after_s == 30
    assert auth.check(f"Bearer {KEY}", peer="10.0.0.2") == "key#0"  # another peer is not affected
    clock.now += 29.5
    assert _refusal(auth, f"Bearer {KEY}").retry_after_s == pytest.approx(0.5)
    clock.now += 0.5
    assert auth.check(f"Bearer {KEY}", peer="10.0.0.1") == "key#0"
    # A new window: it takes max_failures wrong keys again.
    for _ in range(2):
        assert not isinstance(_refusal(auth, "Bearer sk-guess"), Throttled)
    assert auth.check(f"Bearer {KEY}", peer="10.0.0.1") == "key#0"


def test_failures_older_than_the_window_are_forgotten_and_missing_keys_not_counted():
    clock = Clock()
    auth = _auth(clock)
    for _ in range(2):
        _refusal(auth, "Bearer sk-guess")
    clock.now += 61
    for _ in range(10):
        assert "missing API key" in str(_refusal(auth, ""))
    for _ in range(2):
        assert "malformed" in str(_refusal(auth, "Basic abc"))  # counted: it could be a guess
    assert str(_refusal(auth, "Bearer sk-guess")) == "invalid API key"  # the third: locks
    assert isinstance(_refusal(auth, "Bearer sk-guess"), Throttled)


def test_throttle_memory_is_bounded():
    throttle = FailureThrottle(max_failures=5, window_s=60, lockout_s=30, max_peers=100)
    for i in range(10_000):
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", now=float(i) / 1000)
    assert len(throttle._peers) <= 100


def test_peer_is_the_address_without_port_same_as_http():
    assert peer_of("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_of("ipv6:[::1]:5555") == peer_of("ipv6:%5B::1%5D:5555") == "::1"


def test_retry_info_metadata_is_a_google_rpc_status():
    from google.rpc import error_details_pb2, status_pb2

    ((key, value),) = retry_info_metadata(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", 1.5)
    status = status_pb2.Status.FromString(value)
    info = error_details_pb2.RetryInfo()
    assert key == "grpc-status-details-bin" and status.code == 8 and status.details[0].Unpack(info)
    assert info.retry_delay.seconds == 1 and info.retry_delay.nanos == 500_000_000


# -- membership ---------------------------------------------------------------------------------
def test_token_check_codes():
    check_token("t0k", [(TOKEN_HEADER, "t0k")])
    with pytest.raises(_Refused) as err:
        check_token("t0k", [("authorization", "Bearer t0k")])
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(_Refused) as err:
        check_token("t0k", [(TOKEN_HEADER, "t0K")])
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_member_role_check_codes():
    check_member_cert({"x509_pem_cert": [b"..."], "peer_uri": [MEMBER_URI.encode()]})
    for ctx, code in (({"x509_pem_cert": [b"..."], "peer_uri": [b"spiffe://stagemesh/client"]},
                       grpc.StatusCode.PERMISSION_DENIED),
                      ({"x509_pem_cert": [b"..."]}, grpc.StatusCode.PERMISSION_DENIED),
                      ({}, grpc.StatusCode.UNAUTHENTICATED)):
        with pytest.raises(_Refused) as err:
            check_member_cert(ctx)
        assert err.value.code == code


def test_guarded_methods():
    assert is_guarded("/stagemesh.v1.Stage/SetSlowdown") and is_guarded("/stagemesh.v1.Coordinator/Register")
    assert is_guarded("/stagemesh.v1.CacheIndex/Publish")
    assert not is_guarded("/stagemesh.v1.Stage/Stats") and not is_guarded("/stagemesh.v1.Coordinator/GetPlan")
    assert not is_guarded("/grpc.health.v1.Health/Check") and not is_guarded("/stagemesh.v1.Generation/Generate")


def test_cluster_token_from_env_or_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert cluster_token({TOKEN_ENV: "from-env", TOKEN_FILE_ENV: str(path)}) == "from-env"
    assert cluster_token({TOKEN_FILE_ENV: str(path)}) == "from-file"
    assert cluster_token({}) == ""
    with pytest.raises(ValueError, match=TOKEN_FILE_ENV):
        cluster_token({TOKEN_FILE_ENV: str(tmp_path / "missing")})


def test_redis_password_redacted_in_logs():
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://user:pw@h/0") == "rediss://user:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_exposed_without_tls_warns(capsys, monkeypatch):
    import argparse

    from stagemesh.cli.commands import _warn_if_exposed
    from stagemesh.membership import MemberInterceptor, server_interceptors

    for host, tls_dir, warned in (("0.0.0.0", "", True), ("10.1.2.3", "", True), ("127.0.0.1", "", False),
                                  ("localhost", "", False), ("0.0.0.0", "certs", False)):
        _warn_if_exposed(argparse.Namespace(host=host, tls_dir=tls_dir))
        assert ("warning: --host" in capsys.readouterr().err) == warned, host
    # A hand-started internal service: open (trusted-network mode) without TLS or token, and it
    # says so when it binds beyond loopback; with a token it checks it.
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    assert server_interceptors("127.0.0.1", None, "stage worker") == []
    assert capsys.readouterr().err == ""
    assert server_interceptors("0.0.0.0", None, "stage worker") == []
    assert "anyone who reaches it controls this stage worker" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, "t0k")
    (interceptor,) = server_interceptors("0.0.0.0", None, "stage worker")
    assert isinstance(interceptor, MemberInterceptor) and interceptor.token == "t0k" and not interceptor.tls
