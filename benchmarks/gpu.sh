#!/usr/bin/env bash
# The benchmark on a GPU: an 8B-shaped model (Llama-3.1-8B's config, random weights, no download)
# in bfloat16 at 1024 tokens. The papers' method takes minutes per sample at this size, so each
# method times two samples.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
gradspec bench bench.model_config=benchmarks/llama3_1_8b.json bench.tokens=1024 bench.samples=2 \
  extract.device=cuda extract.dtype=bfloat16 extract.batch_size=2 \
  bench.output=benchmarks/RESULTS-gpu.md "$@"
