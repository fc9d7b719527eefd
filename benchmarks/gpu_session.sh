#!/usr/bin/env bash
# The main session's GPU driver (benchmarks/RESULTS.md says which session ran what). The model travels in two
# calls (shared/gpu.md): call 1 carries .m1 (first GGUF part + the transformers wheel) and .whl (gguf, fla-core,
# tokenizers) and runs `PHASE=0 bash benchmarks/gpu_session.sh` (installs, then the fla family benchmark alone
# on the card); call 2, sent at once, carries .m2 (second part) and runs `PHASE=1 ...`; call 3 `PHASE=2 ...`
# resumes every job and evaluates the conversions. Every job writes under /tmp/w (kept while the machine is
# warm), is resumable, and stops before the call's limit; then one tar per job goes into $OUT.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
T0=$(date +%s); LIMIT=${LIMIT:-540}; PHASE=${PHASE:-1}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
mkdir -p /tmp/model /tmp/whl
[ -d .m1 ] && cp .m1/part00 /tmp/model/ && cp .m1/*.whl /tmp/whl/
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl /tmp/whl/*.whl || exit 4
rm -rf /tmp/ap; python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/ap . || exit 4
export PYTHONPATH=/tmp/ap:/tmp/site
if [ "$PHASE" = 0 ]; then  # the kernel families alone on the card: fla parity and prefill time against SDPA
  timeout $(( $(left) - 5 )) python3 benchmarks/gpu_families.py --out $OUT/families --lengths 2048 8192 32768
  exit 0
fi
if [ ! -f /tmp/model/smollm2.gguf ]; then
  cp .m2/part0* /tmp/model/ && cat /tmp/model/part0* > /tmp/model/smollm2.gguf || exit 3
fi
sha256sum /tmp/model/smollm2.gguf | grep -q ^b179c952 || { echo BADHASH; exit 3; }
M=/tmp/model/smollm2.gguf; W=/tmp/w; mkdir -p $W/logs
AP="python3 -m attnprobe.analyses.cli"
echo "setup done at $(( $(date +%s) - T0 )) s"
nvidia-smi --query-gpu=name,memory.used --format=csv > $W/logs/gpu.txt
# 1. census, then the masking sweep beside the budget sweep (both rank heads with this census); the budget sweep
#    streams with DuoAttention's sizes (64 sinks + 256 recent; 4 + 64 ran on the CPU) and trains its gates
( MODEL=$M timeout $(left) bash benchmarks/gpu_restate.sh $W/restate census
  MODEL=$M timeout $(( $(left) - 10 )) bash benchmarks/gpu_restate.sh $W/restate sweep > $W/logs/sweep.txt 2>&1 &
  OUT=$W/budget CENSUS=$W/restate/census MODEL=$M LIMIT=$(( $(left) - 60 )) HARD=$(( $(left) - 10 )) \
    EXTRA="--selectors retrieval,razor,duo,fit,random --budgets 0.125,0.25,0.5,0.75 --kinds sink+window:sinks=64,window=256" \
    bash benchmarks/gpu_budget.sh > $W/logs/budget.txt 2>&1
  wait ) > $W/logs/restate.txt 2>&1 &
# 2. the matrix on the recall tasks, two halves side by side, resumable per architecture
( MODEL=$M timeout $(left) python3 -m attnprobe.analyses.cli --device cuda swap --model $M --matrix --gpu-sizes \
    --variants original,sink+window,window+linear,layers-1of2-softmax,layers-1of4-softmax-gdn --out $W/m1 ) > $W/logs/m1.txt 2>&1 &
( MODEL=$M timeout $(left) python3 -m attnprobe.analyses.cli --device cuda swap --model $M --matrix --gpu-sizes \
    --variants all-gated-deltanet,all-hedgehog,all-gla,all-decay,sink+window+gdn --out $W/m2 ) > $W/logs/m2.txt 2>&1 &
# 3. two-stage conversion of three rows and the control, then (phase 2) their gated evaluation
( if [ "$PHASE" = 1 ]; then PARTS=data,convert; else PARTS=convert,evaluate; fi
  timeout $(( $(left) - 25 )) python3 benchmarks/gpu_convert.py --model $M --part $PARTS --tokens 2M \
    --rows all-gated-deltanet,layers-1of4-softmax-gdn,all-hedgehog --out $W/convert --work $W/convert_work ) > $W/logs/convert.txt 2>&1 &
while [ "$(left)" -gt 15 ] && [ -n "$(jobs -r)" ]; do sleep 5; done
echo "jobs done or stopped at $(( $(date +%s) - T0 )) s: $(jobs -r | wc -l) still running"
kill $(jobs -p) 2>/dev/null; sleep 2
cd $W; for d in restate m1 m2 budget logs; do [ -e $d ] && tar -czf $OUT/$d.tgz --exclude='*.gguf' --exclude='*.pt' $d; done
[ -d convert ] && tar -czf $OUT/convert.tgz --exclude='conversions-*.tar' convert
[ "$PHASE" = 2 ] && for c in convert/conversions-*.tar; do [ -f "$c" ] && cp "$c" $OUT/; done
ls -la $OUT
