"""A mesh serving the OpenAI HTTP API, for the tests that talk to it through the `openai` client."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import openai

from stagemesh.cli.harness import manual_mesh, new_port


def with_chat_template(model_dir: Path, template: str) -> Path:
    """Write `template` into the checkpoint's tokenizer_config.json; returns model_dir."""
    path = model_dir / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": template}))
    return model_dir


@contextlib.contextmanager
def openai_mesh(model_dir: Path, stages: int, kv_blocks: int, timeout: float = 60):
    """manual_mesh with the gateway's HTTP port on: m["base"] its URL, m["client"] an `openai.OpenAI`
    client of it (no retries)."""
    http_port = new_port()
    with manual_mesh(model_dir, stages=stages, kv_blocks=kv_blocks, gateway_args=("--http-port", str(http_port))) as m:
        m["base"] = f"http://127.0.0.1:{http_port}"
        m["client"] = openai.OpenAI(base_url=m["base"] + "/v1", api_key="unused", max_retries=0, timeout=timeout)
        yield m
