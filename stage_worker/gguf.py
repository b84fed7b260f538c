"""A stage's tensors from a GGUF file: read by name through the `gguf` package (llama.cpp's
reader, the file memory-mapped), dequantized one tensor at a time to float32 with
`gguf.quants.dequantize` (F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, the K-quants, the IQ types:
whatever that version of `gguf` supports), and handed to the loader under Hugging Face names.
Only the tensors of the stage's layer range are touched, so a stage dequantizes only its layers;
of a split set (`name-0000k-of-0000N.gguf`) it opens the files that hold them, and of a stacked
expert tensor (`ffn_*_exps`, [n_experts, out, in]) it dequantizes each expert's rows alone.

llama.cpp's converter permutes the rows of Llama's q_proj/k_proj (weights and biases) so that
each head's rotary pairs are interleaved (its rope is the GPT-J style); the HF layout, which the
stage's rotary code expects, is restored here exactly as transformers' GGUF loader does
(`LlamaTensorProcessor._reverse_permute_weights`). Other layouts need nothing here: Phi-3's
fused qkv / gate_up are the HF tensors (the stage splits them), Gemma 2's norms hold 1 + w
(the stage's own layout; gguf_file.NORMS_HOLD_ONE_PLUS_W).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from stagemesh.errors import CheckpointError
from stagemesh.gguf_file import PERMUTED_QK, file_reader, gguf_architecture, hf_tensor_names


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` (w: [n_head * head_dim, ...])."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFTensors:
    """The tensors of one GGUF file (or split set) by Hugging Face name. Used by one loading thread."""

    def __init__(self, path: str | Path, num_heads: int, num_kv_heads: int):
        self.path = Path(path)
        self.arch, _ = gguf_architecture(self.path)
        self.names = hf_tensor_names(self.path)  # HF name -> GGUFRef(file, tensor, expert)
        self.heads = {"attn_q": num_heads, "attn_k": num_kv_heads}
        self._by_name: dict[str, dict] = {}

    def locations(self) -> dict[str, Path]:
        """HF tensor name -> the file holding it (the loader groups reads by file)."""
        return {name: Path(ref.file) for name, ref in self.names.items()}

    def _tensor(self, file: str, name: str):
        if file not in self._by_name:
            self._by_name[file] = {t.name: t for t in file_reader(file).tensors}
        return self._by_name[file][name]

    def read(self, hf_name: str) -> torch.Tensor:
        """The float32 value of one tensor, in the Hugging Face layout."""
        from gguf.quants import dequantize

        ref = self.names[hf_name]
        t = self._tensor(ref.file, ref.name)
        # the reader's shape is llama.cpp's, innermost first: a weight [out, in] is (in, out) there
        shape = [int(n) for n in reversed(t.shape)]
        data = t.data
        if ref.expert is not None:  # one expert of [n_experts, out, in]: its own blocks only
            data, shape = data[ref.expert], shape[1:]
        try:
            w = dequantize(data, t.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(f"{ref.file}: {ref.name} is of type {t.tensor_type.name}, which this "
                                  f"version of the gguf package cannot dequantize ({exc})") from exc
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        role = ref.name.split(".")[-2]
        if self.arch in PERMUTED_QK and role in self.heads:
            w = unpermute_qk(w, self.heads[role])
        if np.may_share_memory(w, t.data) or not w.flags.writeable:
            # F32 dequantizes to a view of the read-only memory-mapped file: the stage owns a copy.
            # Everything else is already a fresh array; copying it too doubled the peak host memory.
            w = w.copy()
        return torch.from_numpy(np.ascontiguousarray(w))

    def tensors(self, path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.read(name)
