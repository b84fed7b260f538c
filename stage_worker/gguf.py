"""A stage's tensors from a GGUF file: read by name through the `gguf` package (llama.cpp's
reader, the file memory-mapped), dequantized one tensor at a time to float32 with
`gguf.quants.dequantize` (F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, the K-quants, the IQ types:
whatever that version of `gguf` supports), and handed to the loader under Hugging Face names.
Only the tensors of the stage's layer range are touched, so a stage dequantizes only its layers.

llama.cpp's converter permutes the rows of Llama's q_proj/k_proj (weights and biases) so that
each head's rotary pairs are interleaved (its rope is the GPT-J style); the HF layout, which the
stage's rotary code expects, is restored here exactly as transformers' GGUF loader does
(`LlamaTensorProcessor._reverse_permute_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from stagemesh.errors import CheckpointError
from stagemesh.gguf_file import PERMUTED_QK, gguf_architecture, hf_tensor_names, open_gguf


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` (w: [n_head * head_dim, ...])."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFTensors:
    """The tensors of one GGUF file by Hugging Face name. Used by one loading thread."""

    def __init__(self, path: str | Path, num_heads: int, num_kv_heads: int):
        self.path = Path(path)
        self.arch, _ = gguf_architecture(self.path)
        self.reader = open_gguf(str(self.path))
        self.names = hf_tensor_names(self.path)  # HF name -> GGUF name
        self.by_name = {t.name: t for t in self.reader.tensors}
        self.heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    def locations(self) -> dict[str, Path]:
        """HF tensor name -> this file (the loader groups reads by file)."""
        return {name: self.path for name in self.names}

    def read(self, hf_name: str) -> torch.Tensor:
        """The float32 value of one tensor, in the Hugging Face layout."""
        from gguf.quants import dequantize

        gguf_name = self.names[hf_name]
        t = self.by_name[gguf_name]
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(f"{self.path}: {gguf_name} is of type {t.tensor_type.name}, which this "
                                  f"version of the gguf package cannot dequantize ({exc})") from exc
        # the reader's shape is llama.cpp's, innermost first: a weight [out, in] is (in, out) there
        w = np.asarray(w, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
        role = gguf_name.split(".")[-2]
        if self.arch in PERMUTED_QK and role in self.heads:
            w = unpermute_qk(w, self.heads[role])
        return torch.from_numpy(np.array(w, dtype=np.float32, copy=True))

    def tensors(self, path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.read(name)
