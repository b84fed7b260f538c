"""GGUF files of the families beyond Llama/Qwen: Gemma 2, Phi-3, Mixtral (llama.cpp's "llama" with
experts, stacked `ffn_*_exps` or the older per-expert tensors), Qwen3-MoE; and split GGUF sets.

Each tiny transformers-saved checkpoint is written here as llama.cpp's convert_hf_to_gguf.py
writes it (its tensor names, Gemma's norms stored as 1 + w, Phi-3's fused qkv / gate_up and its
LongRoPE factors as tensors, the Q/K row permutation of llama-architecture files, experts stacked),
and the stage loaded from the GGUF must equal the stage loaded from the safetensors exactly (every
tensor, and the config it is built from). transformers' own GGUF loader drops what these files
keep (Gemma 2's soft caps and attention scale, Phi-3's window and LongRoPE; it cannot load a
llama file with experts), so the original checkpoint is the reference here, not transformers'
reading of the GGUF; Llama/Qwen GGUFs are checked against transformers in tests/test_gguf.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stagemesh.cli.demo_model import train_tokenizer
from stagemesh.gguf_file import gguf_files, gguf_name
from stagemesh.model_config import ModelConfig
from tests.checkpoints import make_hf_checkpoint

gguf = pytest.importorskip("gguf")

ARCH = {"gemma2": "gemma2", "phi3": "phi3", "mixtral": "llama", "qwen3_moe": "qwen3moe", "llama": "llama"}
EXPERT_PARTS = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(w, cfg: dict) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if cfg["model_type"] == "gemma2":
        w.add_float32(f"{w.arch}.attn_logit_softcapping", cfg["attn_logit_softcapping"])
        w.add_float32(f"{w.arch}.final_logit_softcapping", cfg["final_logit_softcapping"])
    if "original_max_position_embeddings" in rope:
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if cfg.get("num_local_experts"):
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    tok = json.loads(train_tokenizer(cfg["vocab_size"]).to_str())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), cfg["vocab_size"])])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def _tensors(cfg: dict, weights: dict, stacked: bool) -> dict[str, np.ndarray]:
    """llama.cpp's tensors of a HF state dict (convert_hf_to_gguf.py's modify_tensors, in short)."""
    arch, out, experts = ARCH[cfg["model_type"]], {}, {}
    for name, t in weights.items():
        data = t.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            data = _permute(data, cfg["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            data = _permute(data, cfg["num_key_value_heads"])
        elif arch == "gemma2" and name.endswith("norm.weight"):
            data = data + 1  # Gemma2Model.modify_tensors
        parts = name.split(".")
        if "experts" in parts:  # model.layers.{i}.<moe>.experts.{e}.<part>.weight
            i, e, part = parts[2], int(parts[-3]), EXPERT_PARTS[parts[-2]]
            if stacked:
                experts.setdefault(f"blk.{i}.{part}_exps.weight", {})[e] = data
            else:
                out[f"blk.{i}.{part}.{e}.weight"] = data
            continue
        out[gguf_name(name, arch)] = data
    for name, by_e in experts.items():
        out[name] = np.stack([by_e[e] for e in sorted(by_e)])
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":  # LlamaModel.generate_extra_tensors (Llama 3.1+)
        out["rope_freqs.weight"] = _llama3_rope_factors(cfg, rope)
    if rope.get("rope_type") == "longrope":  # Phi3MiniModel.generate_extra_tensors
        out["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        out["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    return out


def _llama3_rope_factors(cfg: dict, rope: dict) -> np.ndarray:
    """llama.cpp's rope_freqs: the divisor of each rotary frequency under Llama 3.1's scaling."""
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_family_gguf(hf_dir, out, stacked: bool = True, qtype=None, split_max_tensors: int = 0):
    """The checkpoint at hf_dir as llama.cpp writes it; `qtype` quantizes the matrices and stacked
    experts; `split_max_tensors` writes a gguf-split set (returns its first file)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), ARCH[cfg["model_type"]], split_max_tensors=split_max_tensors)
    _metadata(w, cfg)
    for name, data in _tensors(cfg, load_file(str(hf_dir / "model.safetensors")), stacked).items():
        if qtype is not None and data.ndim >= 2 and "norm" not in name:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out if not split_max_tensors else sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))[0]


CONFIG_KEYS = ("architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias")
RAW_KEYS = ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
            "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "mlp_only_layers",
            "norm_topk_prob", "original_max_position_embeddings")


def _same_config(got: ModelConfig, want: ModelConfig) -> None:
    for key in CONFIG_KEYS:
        assert getattr(got, key) == getattr(want, key), key
    for key in RAW_KEYS:
        assert got.raw.get(key) == want.raw.get(key), key
    strip = lambda rope: {k: v for k, v in rope.items() if (k, v) != ("partial_rotary_factor", 1.0)}  # noqa: E731
    assert strip(got.rope) == strip(want.rope)


def _same_stages(gguf_path, hf_dir, layer_ranges) -> None:
    from stage_worker.loader import load_stage

    for layers in layer_ranges:
        want = load_stage(hf_dir, *layers)[0].state_dict()
        got = load_stage(gguf_path, *layers)[0].state_dict()
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (layers, name)


@pytest.mark.parametrize("kind", ["gemma2", "phi3", "mixtral", "qwen3moe"])
def test_family_gguf_stages_equal_the_safetensors_stages(tmp_path, kind):
    """Gemma 2: norms stored as 1 + w held as they are (not offset twice), its caps, window and
    scale; Phi-3: attn_qkv / fused ffn_up into the merged layout, window, LongRoPE from the factor
    tensors; Mixtral: a llama file with stacked experts (Q/K permuted); Qwen3-MoE: stacked
    experts, q/k norms, its dense layer (no router in the file)."""
    hf_dir = make_hf_checkpoint(tmp_path, kind, num_layers=2)
    if kind == "gemma2":
        # not in the file: llama.cpp scales by the head width (hidden / heads for the 46-layer 27B),
        # which is what gemma-2-2b/9b's config says (256); the tiny checkpoint says 24
        cfg = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({**cfg, "query_pre_attn_scalar": cfg["head_dim"]}))
    path = write_family_gguf(hf_dir, tmp_path / f"{kind}.gguf")
    _same_config(ModelConfig.from_dir(path), ModelConfig.from_dir(hf_dir))
    _same_stages(path, hf_dir, [(0, 1), (1, 2)])


def test_mixtral_experts_stacked_or_per_expert_quantized(tmp_path):
    """Q8_0 experts: each expert of a stacked tensor dequantized alone equals the older per-expert
    tensors (`blk.N.ffn_gate.E.weight`) of the same weights."""
    from stage_worker.loader import load_stage

    hf_dir = make_hf_checkpoint(tmp_path, "mixtral", num_layers=2)
    q8 = gguf.GGMLQuantizationType.Q8_0
    stacked = write_family_gguf(hf_dir, tmp_path / "stacked.gguf", qtype=q8)
    old = write_family_gguf(hf_dir, tmp_path / "old.gguf", stacked=False, qtype=q8)
    got, want = load_stage(stacked, 0, 2)[0].state_dict(), load_stage(old, 0, 2)[0].state_dict()
    ref = load_stage(hf_dir, 0, 2)[0].state_dict()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
        assert torch.allclose(tensor, ref[name], atol=0.02), name  # Q8_0 of the same weights
    assert any("experts" in n or "w13" in n or "gate_up" in n for n in want)


def _hf_gguf_greedy(path, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation on the GGUF file and its logits over prompt + continuation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             eos_token_id=None, pad_token_id=0)
        logits = model(out).logits[0, :-1]
    return out[0, len(prompt):].tolist(), logits


def _transformers_readable(kind: str):
    """Tiny checkpoints whose every setting transformers' GGUF loader also reads or defaults to:
    Gemma 2 with gemma-2-2b's caps (50, 30) and 256-wide heads (its default attention scale);
    Qwen3-MoE with every layer sparse and the experts' width of its default (768)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Qwen3MoeConfig

    common = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=1, pad_token_id=0, initializer_range=0.1)
    if kind == "gemma2":
        cfg = Gemma2Config(**common, intermediate_size=128, head_dim=256, query_pre_attn_scalar=256,
                           sliding_window=6, tie_word_embeddings=True)
    else:
        cfg = Qwen3MoeConfig(**common, intermediate_size=128, head_dim=16, moe_intermediate_size=768,
                             num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)  # norms away from their init, so 1 + w counts
    return model


@pytest.mark.parametrize("kind", ["gemma2", "qwen3moe"])
def test_stages_equal_transformers_loading_the_gguf(tmp_path, kind):
    """Where transformers' GGUF loader keeps everything the file says, the stages' greedy tokens
    (2 stages, chunked prefill) equal `from_pretrained(dir, gguf_file=...)`'s."""
    from stage_worker.loader import load_stage
    from tests.test_model import run_pipeline

    hf_dir = tmp_path / kind
    _transformers_readable(kind).save_pretrained(hf_dir)
    path = write_family_gguf(hf_dir, tmp_path / f"{kind}.gguf")
    stages = [load_stage(path, 0, 1)[0], load_stage(path, 1, 2)[0]]
    prompt = [5, 17, 42, 99, 7, 3, 250, 31, 64, 12, 8]
    tokens, rows = run_pipeline(stages, [prompt], 6)
    want_tokens, want_rows = _hf_gguf_greedy(path, prompt, 6)
    assert tokens[0] == want_tokens
    torch.testing.assert_close(rows[0], want_rows, atol=1e-4, rtol=1e-4)


def test_split_gguf_set_served_from_any_of_its_files(tmp_path, monkeypatch):
    """A gguf-split set (`tiny-0000k-of-00003.gguf`, metadata in the first file, tensors spread
    over all three): named by any file, it is the whole checkpoint (config, tokenizer, up's check);
    a stage opens and reads only the files holding its tensors; a missing file is named."""
    from stage_worker.gguf import GGUFTensors
    from stage_worker.loader import load_stage
    from stagemesh.checkpoint import validate_checkpoint
    from stagemesh.errors import CheckpointError
    from stagemesh.gguf_tokenizer import gguf_tokenizer

    hf_dir = make_hf_checkpoint(tmp_path, "llama", num_layers=4)
    single = write_family_gguf(hf_dir, tmp_path / "one.gguf")
    first = write_family_gguf(hf_dir, tmp_path / "tiny.gguf", split_max_tensors=16)
    files = gguf_files(first)
    assert [f.name for f in files] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert gguf_files(files[1]) == files
    assert validate_checkpoint(files[2]).num_hidden_layers == 4
    assert gguf_tokenizer(str(files[1])).encode("the gateway").ids == gguf_tokenizer(str(single)).encode("the gateway").ids
    read, seen = GGUFTensors.read, []
    monkeypatch.setattr(GGUFTensors, "read", lambda self, name: seen.append(self.names[name].file) or read(self, name))
    refs, opened = GGUFTensors(first, 4, 2).names, []
    for layers in ((0, 1), (1, 3), (3, 4)):
        seen.clear()
        got = load_stage(files[1], *layers)[0].state_dict()
        want = load_stage(single, *layers)[0].state_dict()
        assert all(torch.equal(got[n], t) for n, t in want.items()) and got.keys() == want.keys()
        holding = {ref.file for name, ref in refs.items() if _in_stage(name, layers, 4)}
        assert set(seen) - {str(single)} == holding, layers
        opened.append(len(holding))
    assert min(opened) < 3, opened  # the first stage's tensors lie in fewer files than the set's
    files[2].unlink()
    gguf_files.cache_clear()
    with pytest.raises(CheckpointError, match="tiny-00003-of-00003.gguf of this 3-file split GGUF is missing"):
        ModelConfig.from_dir(files[0])


def _in_stage(name: str, layers: tuple[int, int], n_layers: int) -> bool:
    if name.startswith("model.layers."):
        return layers[0] <= int(name.split(".")[2]) < layers[1]
    return (name == "model.embed_tokens.weight" and layers[0] == 0) or (
        name in ("model.norm.weight", "lm_head.weight") and layers[1] == n_layers)


def test_llama31_rope_freqs_ignored_as_transformers_does(tmp_path):
    """A Llama 3.1+ file carries its rope scaling only as `rope_freqs.weight` (per-frequency
    divisors, no rope.scaling keys); transformers' GGUF loader ignores it (plain rope of
    rope.freq_base), and so does the mesh: its stages equal transformers on the file. llama.cpp
    applies the divisors, as the original checkpoint does: that differs (README)."""
    from stage_worker.loader import load_stage
    from tests.reference import hf_reference
    from tests.test_model import run_pipeline

    hf_dir = make_hf_checkpoint(tmp_path, "llama3", num_layers=2)
    path = write_family_gguf(hf_dir, tmp_path / "llama31.gguf")
    assert ModelConfig.from_dir(path).rope == {"rope_type": "default", "rope_theta": 500000.0}
    prompt = [5, 17, 42, 99, 7, 3, 250, 31, 64, 12, 8, 77, 140, 33, 2, 9]
    tokens, rows = run_pipeline([load_stage(path, 0, 1)[0], load_stage(path, 1, 2)[0]], [prompt], 4)
    want_tokens, want_rows = _hf_gguf_greedy(path, prompt, 4)
    assert tokens[0] == want_tokens
    torch.testing.assert_close(rows[0], want_rows, atol=1e-4, rtol=1e-4)
    _, original = hf_reference(hf_dir, prompt, 4)  # the safetensors checkpoint, llama3 scaling applied
    assert not torch.allclose(rows[0][:len(prompt)], original[:len(prompt)], atol=1e-3)


def test_mesh_serves_a_split_mixtral_gguf(tmp_path):
    """End to end (`stagemesh up`, real processes, 2 stages): a Mixtral GGUF in 3 split files with
    stacked experts, named by its last file, gives the original checkpoint's greedy tokens."""
    from stagemesh.cli.harness import mesh
    from stagemesh.client import Client
    from tests.reference import hf_reference

    hf_dir = make_hf_checkpoint(tmp_path, "mixtral", num_layers=4)
    write_family_gguf(hf_dir, tmp_path / "mix.gguf", split_max_tensors=20)
    last = gguf_files(sorted(tmp_path.glob("mix-*.gguf"))[0])[-1]
    assert last.name == "mix-00003-of-00003.gguf"
    prompt = [5, 17, 42, 99, 7, 3, 250, 31, 64, 12, 8]
    with mesh(last, stages=2, extra=["--plan", "uniform", "--no-rebalance"]) as m, Client(m.address) as client:
        got = client.generate(prompt_ids=prompt, max_tokens=8, ignore_eos=True, timeout=120).to_json()
    assert got["token_ids"] == hf_reference(hf_dir, prompt, 8)[0]
