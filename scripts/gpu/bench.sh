#!/usr/bin/env bash
# One GPU call for the throughput issues: the compiled kernels' GPU tests, stage 2's before/after matrix
# (benchmarks/convert_bench.py) and the decode matrix (benchmarks/decode_bench.py), all on random weights in the
# models' shapes, so no weights travel. Carry .whl (fla_core-0.6.0, liger_kernel-0.8.5 and pytest's wheels):
#   run(command='bash scripts/gpu/bench.sh', carry=['.whl'], timeout_s=560)
# Every step writes into $OUT as it goes and has its own time limit (T_S, A_S, B_S, C_S, D_S seconds; D_S=0 skips
# Qwen), so a slow one cannot take the others' time (about 510 s in all by default). Each step's whole output is in
# $OUT/logs; PROFILE=1 adds one profiled step per stage-2 row (convert_bench --profile); MICRO sets the tokens per
# forward (default 65,536; a row that runs out of memory is retried at half).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
mkdir -p "$OUT/logs"
log() { tee "$OUT/logs/$1.txt" | tail -3; }
timeout "${T_S:-90}" python3 -m pytest -q -x tests/test_fla_gated_backward.py tests/test_decode_cuda.py tests/test_stage2.py 2>&1 | log gpu-tests
P="${PROFILE:+--profile} --micro-tokens ${MICRO:-65536}"  # 64K tokens per forward: the step is host-bound below
cd benchmarks
ROWS=${ROWS:-control,all-gated-deltanet,all-hedgehog,sink+window+gdn,softmax-12.5,all-kda}
timeout "${A_S:-240}" python3 convert_bench.py --matrix "$OUT/convert" --models smollm2 --rows $ROWS --lengths 2048 --paths old,eager-loss,new $P 2>&1 | log convert-2048
timeout "${B_S:-80}" python3 decode_bench.py --shape smollm2 --device cuda --dtype bfloat16 --contexts 32768 --batches 1,8 --modes graph \
    --architectures original,original-split-k,all-gated-deltanet,all-kda,heads-12.5-gated-deltanet,layers-1of4-softmax-gdn --out "$OUT/decode" 2>&1 | log decode
timeout "${C_S:-50}" python3 convert_bench.py --matrix "$OUT/convert" --models smollm2 --rows control --lengths 512 \
    --paths old,+chunked-loss,+bf16-weights,new,liger-loss $P 2>&1 | log convert-512
[ "${D_S:-50}" = 0 ] || timeout "${D_S:-50}" python3 convert_bench.py --matrix "$OUT/convert" --models qwen --rows control,all-gated-deltanet --lengths 2048 --paths old,new $P 2>&1 | log convert-qwen
