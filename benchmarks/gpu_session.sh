#!/usr/bin/env bash
# The main session's GPU driver of 2026-12-01 (benchmarks/RESULTS.md): after the model travels in two calls
# (shared/gpu.md: .m1 = first GGUF part + transformers wheel, .m2 = second part, .whl = gguf/fla/tokenizers wheels),
# `PHASE=1 bash benchmarks/gpu_session.sh`, then at once `PHASE=2 ...` (resumes every job, then evaluates).
# Main-session GPU driver: every job in parallel on one H200, each writing under /tmp/w (kept while warm),
# each stopped before the call's limit; then one tar per job into $OUT. Run it again to resume.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$(date +%s); LIMIT=${LIMIT:-530}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
if [ ! -f /tmp/model/smollm2.gguf ]; then
  cp .m2/part01 /tmp/model/ && cat /tmp/model/part00 /tmp/model/part01 > /tmp/model/smollm2.gguf || exit 3
fi
sha256sum /tmp/model/smollm2.gguf | grep -q ^b179c952 || { echo BADHASH; exit 3; }
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl /tmp/whl/*.whl || exit 4
rm -rf /tmp/ap; python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/ap . || exit 4
export PYTHONPATH=/tmp/ap:/tmp/site
M=/tmp/model/smollm2.gguf; W=/tmp/w; mkdir -p $W/logs
AP="python3 -m attnprobe.analyses.cli"
[ -d ~/.cache/attnprobe ] && ls ~/.cache/attnprobe | grep -q smollm2 || $AP info --model $M > $W/logs/info.txt 2>&1
echo "setup done at $(( $(date +%s) - T0 )) s"
nvidia-smi --query-gpu=name,memory.used --format=csv > $W/logs/gpu.txt
# 1. census, then the masking sweep and the budget sweep (both rank heads with this census)
( MODEL=$M timeout $(left) bash benchmarks/gpu_restate.sh $W/restate census
  MODEL=$M timeout $(left) bash benchmarks/gpu_restate.sh $W/restate sweep > $W/logs/sweep.txt 2>&1 &
  OUT=$W/budget CENSUS=$W/restate/census MODEL=$M LIMIT=$(( $(left) - 120 )) HARD=$(( $(left) - 10 )) bash benchmarks/gpu_budget.sh > $W/logs/budget.txt 2>&1
  wait ) > $W/logs/restate.txt 2>&1 &
# 2. the matrix (two halves in parallel), resumable per architecture
( MODEL=$M timeout $(left) bash benchmarks/gpu_restate.sh $W/m1 matrix ) > $W/logs/m1.txt 2>&1 &
( MODEL=$M timeout $(left) bash benchmarks/gpu_restate.sh $W/m2 matrix-rest ) > $W/logs/m2.txt 2>&1 &
# 3. two-stage conversion
( if [ "${PHASE:-1}" = 1 ]; then PARTS=throughput,data,convert; else PARTS=convert,evaluate; fi
  timeout $(( $(left) - 25 )) python3 benchmarks/gpu_convert.py --model $M --part $PARTS --rows all-hedgehog,layers-1of4-softmax,all-gated-deltanet --minutes 5 --out $W/convert --work $W/convert_work ) > $W/logs/convert.txt 2>&1 &
# 4. kernel families and decode benchmarks
( [ -f $W/bench/decode_b8/decode_bench.md ] && exit 0
  timeout 200 python3 benchmarks/gpu_families.py --out $W/bench/families --lengths 2048 8192 32768
  timeout $(( $(left) - 20 )) python3 benchmarks/decode_bench.py --model $M --device cuda --dtype bfloat16 --contexts 2048,8192,32768 --new-tokens 64 --out $W/bench/decode
  timeout $(( $(left) - 20 )) python3 benchmarks/decode_bench.py --model $M --device cuda --dtype bfloat16 --contexts 2048,8192,32768 --new-tokens 32 --batch 8 --out $W/bench/decode_b8
  timeout $(( $(left) - 20 )) python3 benchmarks/decode_bench.py --model $M --device cuda --dtype bfloat16 --contexts 32768 --new-tokens 16 --profile --out $W/bench/profile
) > $W/logs/bench.txt 2>&1 &
while [ "$(left)" -gt 15 ] && [ -n "$(jobs -r)" ]; do sleep 5; done
echo "jobs done or stopped at $(( $(date +%s) - T0 )) s: $(jobs -r | wc -l) still running"
kill $(jobs -p) 2>/dev/null; sleep 2
cd $W; for d in restate m1 m2 budget bench logs; do [ -e $d ] && tar -czf $OUT/$d.tgz --exclude='*.gguf' $d; done
[ -d convert ] && tar -czf $OUT/convert.tgz --exclude='conversions-*.tar' convert && c=$(ls convert/conversions-*.tar 2>/dev/null | tail -1) && [ -n "$c" ] && cp $c $OUT/
ls -la $OUT
