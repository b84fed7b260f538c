"""Fuzz the HTTP API from its own OpenAPI document (schemathesis), against a mesh run as users run it.

`stagemesh up --http-port` serves the demo model (real tokenizer, a ChatML template) on one
stage. Schemathesis reads /openapi.json and sends what the schema allows and what it does not;
every answer must be documented (status, content type, body schema), never a 5xx, and a method the
path does not take must be a 405 with `Allow`. Afterwards no process of the mesh has died or been
replaced and no stage holds a KV block (`stagemesh status --json`).

Bounded: a few examples per operation, no shrinking database; about half a minute here.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import time

import psutil
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from stagemesh.cli.demo_model import write_demo_model
from stagemesh.net import free_port
from stagemesh.cli.harness import mesh as running_mesh
from stagemesh.cli.harness import stagemesh_cmd
from tests.meshes import with_chat_template
from tests.test_http_api import CHATML

STATUSES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def http_mesh(tmp_path_factory):
    model_dir = with_chat_template(write_demo_model(tmp_path_factory.mktemp("schema") / "demo", num_layers=2,
                                                    max_positions=256), CHATML)
    port = free_port()
    with running_mesh(model_dir, extra=["--http-port", str(port)]) as m:
        yield {"up": m, "base": f"http://127.0.0.1:{port}", "pids": _descendants(m.proc.pid),
               "coordinator": re.search(r"coordinator (\S+)", m.ready_line).group(1)}


def _descendants(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


@pytest.fixture(scope="module")
def api_schema(http_mesh):
    return schemathesis.openapi.from_url(f"{http_mesh['base']}/openapi.json")


# schemathesis' own pytest plugin (`@schema.parametrize`) fails on pytest 9 (`_nodeid`); its
# Hypothesis strategy is the same generator, driven here with `@given`.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_http_api_conforms_to_its_schema(http_mesh, api_schema, mode):
    @EXAMPLES
    @given(case=api_schema.as_strategy(generation_mode=mode))
    def check(case):
        # positive_data_acceptance is off: the schema cannot say that prompt + max_tokens must fit
        # the context or that ids must be below the vocabulary size, so valid-looking bodies get a 400.
        response = case.call_and_validate(base_url=http_mesh["base"], timeout=60,
                                          excluded_checks=[positive_data_acceptance])
        STATUSES[f"{mode.value} {case.method} {case.path}"][response.status_code] += 1

    check()
    print("\nanswers by status:", {k: dict(v) for k, v in sorted(STATUSES.items())})


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "The old mill", "max_tokens": 6, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "stream": True,
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}),
])
def test_answers_conform_event_by_event(http_mesh, api_schema, path, body):
    """Streams too, whatever the random cases above drew: each event's JSON against its chunk schema."""
    case = api_schema[path]["POST"].Case(body=body, media_type="application/json")
    response = case.call_and_validate(base_url=http_mesh["base"], timeout=60,
                                      excluded_checks=[positive_data_acceptance])
    assert response.status_code == 200, response.text
    if body.get("stream"):
        assert response.text.rstrip().endswith("data: [DONE]") and response.text.count("data: ") >= 3


def test_undocumented_methods_are_405_with_allow(http_mesh, api_schema):
    for path, operations in api_schema.raw_schema["paths"].items():
        url = http_mesh["base"] + path.replace("{model}", "demo")
        allowed = {m.upper() for m in operations}
        for method in {"GET", "POST", "PUT", "DELETE", "PATCH"} - allowed:
            r = requests.request(method, url, timeout=10)
            assert r.status_code == 405, (method, path, r.status_code)
            assert set(r.headers["allow"].replace(" ", "").split(",")) >= allowed, (method, path, r.headers)
            assert r.json()["error"]["message"], r.text


def test_after_fuzzing_nothing_died_and_no_kv_is_held(http_mesh):
    up = http_mesh["up"]
    assert up.proc.poll() is None, "".join(up.stderr_lines[-20:])
    now = _descendants(up.proc.pid)
    assert now == http_mesh["pids"], f"processes of the mesh replaced or gone: {http_mesh['pids']} -> {now}"
    assert requests.get(f"{http_mesh['base']}/health", timeout=10).json() == {"status": "serving"}
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run([*stagemesh_cmd(), "status", "--coordinator", http_mesh["coordinator"], "--json"],
                             capture_output=True, text=True, timeout=30)
        stages = [s for r in json.loads(out.stdout)["replicas"] for s in r["stages"]]
        used = [s["kv_blocks_used"] for s in stages]
        if stages and not any(used):
            return
        assert time.monotonic() < deadline, f"KV blocks still held after fuzzing: {used}"
        time.sleep(0.2)
