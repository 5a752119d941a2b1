#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, in the parts one lent GPU session ran them (each part
# fits one 10-minute command). Run from the repository root on a CUDA machine that has torch and
# transformers; lord_export is used from the checkout (PYTHONPATH), results go to ${OUT:-gpu-results}.
#
#   bash benchmarks/gpu_runs.sh smoke|compile-small|bench|bench-compile|scale2|scale8|scale32|bench-multiples|decode-graphs|torchao|heal-memory
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/benchmarks:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SEVEN_B=(--hidden 4096 --intermediate 11008 --vocab 32000)
BACKENDS=eager,compile,ort-cuda,tensorrt

for part in "$@"; do
  echo "=== $part $(date -u +%FT%TZ)"
  case $part in
    smoke)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
      python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5 ;;
    bench)  # mid-size Llama and a 4-layer Llama-2-7B-shaped model, bf16, rank multiple 64
      python3 benchmarks/bench_llama.py --dtype bfloat16 --tokens 512 2048 --backends $BACKENDS --repeats 5 \
        --json "$OUT/bench_llama_cuda_bf16.json"
      python3 benchmarks/bench_llama.py --dtype bfloat16 "${SEVEN_B[@]}" --layers 4 --tokens 512 2048 \
        --backends $BACKENDS --repeats 5 --json "$OUT/bench_llama7b_cuda_bf16.json" ;;
    compile-small)  # the compile backend on a small model, quick to rerun while fixing it
      python3 benchmarks/bench_llama.py --dtype bfloat16 --hidden 256 --intermediate 512 --layers 2 --vocab 1024 \
        --tokens 256 --backends compile --decode-tokens 8 --repeats 2 --warmup 1 --verbose \
        --json "$OUT/bench_small_compile.json" ;;
    bench-compile)  # the compile rows alone (7B-shaped first), after the GPU-only fix of the pass
      python3 benchmarks/bench_llama.py --dtype bfloat16 "${SEVEN_B[@]}" --layers 4 --tokens 512 2048 \
        --backends compile --repeats 5 --json "$OUT/bench_llama7b_cuda_bf16_compile.json"
      python3 benchmarks/bench_llama.py --dtype bfloat16 --tokens 512 2048 --backends compile --repeats 5 \
        --json "$OUT/bench_llama_cuda_bf16_compile.json" ;;
    scale8)
      python3 benchmarks/compress_scale.py --device cuda --layers 8 --work /tmp --json "$OUT/compress_scale_cuda_8.json" ;;
    scale2)  # per-block GPU time of the block-by-block compressor, for the 32-layer estimate
      python3 benchmarks/compress_scale.py --device cuda --layers 2 --work /tmp --json "$OUT/compress_scale_cuda_2.json" ;;
    scale32)
      python3 benchmarks/compress_scale.py --device cuda --layers 32 --work /tmp --json "$OUT/compress_scale_cuda_32.json" ;;
    bench-multiples)  # tensor-core friendly ranks: --rank-multiple 8 and 128 (64 is in 'bench')
      for m in 8 128; do
        python3 benchmarks/bench_llama.py --dtype bfloat16 "${SEVEN_B[@]}" --layers 4 --tokens 512 2048 \
          --backends eager,compile --repeats 5 --rank-multiple $m --json "$OUT/bench_llama7b_cuda_bf16_m$m.json"
      done ;;
    decode-graphs)  # decode under CUDA graphs (static cache, mode="reduce-overhead"), rank multiples 8/64/128
      python3 benchmarks/decode_graphs.py --dtype bfloat16 "${SEVEN_B[@]}" --layers 4 --multiples 8 64 128 \
        --batches 1 16 --json "$OUT/decode_graphs_7b_cuda_bf16.json" ;;
    torchao)
      python3 benchmarks/torchao_weight_only.py "${SEVEN_B[@]}" --layers 4 --rank-multiple 128 ${TORCHAO_FLAGS:-} \
        --json "$OUT/torchao_weight_only_cuda.json" ;;
    heal-memory)  # LoRA on dense vs LoRD (bf16), and QLoRA on dense, on a 4-layer 7B-shaped model
      python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from compress_scale import write_model; Path('/tmp/llama7b-4').mkdir(exist_ok=True); write_model(Path('/tmp/llama7b-4'), 4, device='cuda')"
      python3 benchmarks/heal_memory.py --model-dir /tmp/llama7b-4 --device cuda --dtype bfloat16 --qlora \
        --rank-reduction 0.5 --steps 20 --batch-size 8 --threads 8 --out "$OUT/heal_memory_cuda.json" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
