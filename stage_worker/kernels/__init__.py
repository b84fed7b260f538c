"""The stage's Triton kernels, each beside its plain-torch reference (STYLE.md item 14).

- `fused_ops`: RMSNorm (+ residual add), SiLU * up, rotary + K/V write, flash-decoding combine.
- `paged_decode`: decode rows reading K/V through block tables (flash decoding, splits).
- `unified_attention`: mixed micro-batches (prefill chunks and decode rows) in one launch.
- `softmax`: the online-softmax step both attention kernels run over each block of keys.
- `moe_align`: a routed batch's (token, slot) pairs sorted by expert, padded per expert, on the device.
- `fused_moe`: the routed experts as two grouped GEMM launches (bf16/fp16/fp32 or block-FP8 stacks).
- `mla_decode`: DeepSeek's latent attention for decode rows (paged, split context + LSE merge).
- `mla_prefill`: latent attention for mixed micro-batches in one launch (unified_attention's tiling).
- `fp8_act`: FP8 activations: per-token 1x128 and per-row quant, `Fp8Act`.
- `fp8`: the block-scaled FP8 GEMMs (Triton, or torch._scaled_mm) and the decode GEMV.
- `tuning`: launch tiles and dispatch thresholds per GPU (`--kernel-tuning`), read at launch.

Every public op dispatches to Triton on CUDA when Triton imports (`use_triton=None`) and to its
`*_torch` reference elsewhere; `use_triton=True` forces the kernel, which under
`TRITON_INTERPRET=1` runs on CPU tensors (tests/test_kernels.py checks each against its reference
that way). Triton is optional: a CPU-only install never needs it.
"""
