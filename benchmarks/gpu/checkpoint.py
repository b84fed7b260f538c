"""Random bf16 checkpoints drawn on the GPU (no hub access on the device machine), written as a
real checkpoint: config.json, sharded safetensors and their index."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.gpu.common import log


class ShardWriter:
    """Tensors set by name go into the current shard; `flush(file)` writes it (in the background,
    once copied off the GPU); `close()` writes the index."""

    def __init__(self, path: Path, seed: int = 0):
        import torch

        self.path = path
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.weight_map: dict[str, str] = {}
        self.shard: dict = {}
        self._pool, self._futures = ThreadPoolExecutor(4), []

    def rnd(self, *shape, std: float = 0.02):
        import torch

        return (torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32) * std).to(
            torch.bfloat16)

    def norm(self, n: int):
        """An RMSNorm weight: 1 + N(0, 0.05)."""
        return (1 + self.rnd(n, std=0.05)).contiguous()

    def __setitem__(self, name: str, tensor) -> None:
        self.shard[name] = tensor

    def flush(self, file: str) -> None:
        from safetensors.torch import save_file

        if self.shard:
            host = {k: t.cpu() for k, t in self.shard.items()}
            self._futures.append(self._pool.submit(save_file, host, str(self.path / file), {"format": "pt"}))
            self.weight_map.update({k: file for k in host})
            self.shard.clear()

    def close(self) -> None:
        import torch

        for f in self._futures:
            f.result()
        self._pool.shutdown()
        index = {"metadata": {}, "weight_map": self.weight_map}
        (self.path / "model.safetensors.index.json").write_text(json.dumps(index))
        if self.device == "cuda":
            torch.cuda.empty_cache()


def llama8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        torch_dtype="bfloat16",
    )


def write_llama8b(path: Path) -> Path:
    """A Llama-3.1-8B-shaped checkpoint of random weights (std 0.02), unless path holds one."""
    if (path / "config.json").is_file():
        return path
    t0 = time.time()
    path.mkdir(parents=True, exist_ok=True)
    cfg = llama8b_config()
    cfg.save_pretrained(path)
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = ShardWriter(path)
    w["model.embed_tokens.weight"] = w.rnd(cfg.vocab_size, h)
    w.flush("model-embed.safetensors")
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = w.norm(h)
        w[p + "post_attention_layernorm.weight"] = w.norm(h)
        w[p + "self_attn.q_proj.weight"] = w.rnd(hq * d, h)
        w[p + "self_attn.k_proj.weight"] = w.rnd(hkv * d, h)
        w[p + "self_attn.v_proj.weight"] = w.rnd(hkv * d, h)
        w[p + "self_attn.o_proj.weight"] = w.rnd(h, hq * d)
        w[p + "mlp.gate_proj.weight"] = w.rnd(i, h)
        w[p + "mlp.up_proj.weight"] = w.rnd(i, h)
        w[p + "mlp.down_proj.weight"] = w.rnd(h, i)
        if layer % 4 == 3:
            w.flush(f"model-layers-{layer // 4}.safetensors")
    w["model.norm.weight"] = w.norm(h)
    w["lm_head.weight"] = w.rnd(cfg.vocab_size, h)
    w.flush("model-head.safetensors")
    w.close()
    log(f"checkpoint written to {path} in {time.time() - t0:.1f}s")
    return path
