"""Meshes as the tests drive them: `stagemesh up` answering gRPC (AsyncClient) against
transformers' greedy tokens, and a mesh serving the OpenAI HTTP API to the `openai` client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

import openai

from stagemesh.cli.harness import blocks_in_use, manual_mesh, mesh, new_port
from stagemesh.client import AsyncClient
from tests.reference import hf_greedy


async def generate_all(address: str, prompts: list[list[int]], max_tokens: int, **kw):
    """Every prompt at once through the gateway at `address`: their results, in prompt order."""
    async with AsyncClient(address) as client:
        return await asyncio.gather(*[
            client.generate(prompt_ids=p, max_tokens=max_tokens, timeout=120, **kw) for p in prompts
        ])


def check_mesh_greedy(model_dir: Path, stages: int, prompts: list[list[int]], max_tokens: int, extra=()) -> None:
    """`stagemesh up` at `stages` stages answers the prompts, sent at once, with transformers' greedy
    tokens. A 16-token prefill budget forces the longer prompts through several chunks."""
    expected = [hf_greedy(model_dir, p, max_tokens) for p in prompts]
    with mesh(model_dir, stages=stages, extra=["--max-batched-tokens", "16", *extra]) as m:
        outs = asyncio.run(generate_all(m.address, prompts, max_tokens))
    for prompt, exp, out in zip(prompts, expected, outs):
        assert out.token_ids == exp, f"{Path(model_dir).name}: prompt of {len(prompt)} tokens diverged"
        assert out.prompt_tokens == len(prompt) and out.completion_tokens == len(exp)
        assert out.finish_reason in ("length", "stop")


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


@contextlib.contextmanager
def peak_kv_blocks(m, every_s: float = 0.005):
    """The most KV blocks any stage of manual_mesh `m` held while the block ran: a one-item list,
    filled by a watcher thread."""
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], *blocks_in_use(m))
            time.sleep(every_s)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield peak
    finally:
        stop.set()
        watcher.join()
