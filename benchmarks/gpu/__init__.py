"""Parts of the GPU benchmarks (bench_gpu.py, bench_deepseek_gpu.py, profile_decode.py):

- `common`: logging, the model's vocabulary, the "mixed" workload and random prompts;
- `checkpoint`: random bf16 checkpoints drawn on the GPU, written as sharded safetensors;
- `inproc`: the stage model in this process (no gRPC): step times, overlap check, profiles;
- `mesh`: `stagemesh up` (stagemesh.cli.harness) driven over gRPC; `probes`: GPU utilisation,
  per-stage busy time, py-spy;
- `reference`: transformers' generate and continuous batching;
- `report`: the table, and the summary written to the results file (raw data only on request).
Kernel accuracy against float64 is `benchmarks/check_attention.py`.
"""
