#!/usr/bin/env bash
# The main session's GPU driver (benchmarks/RESULTS.md says which session ran what). Jobs run as their own
# process sessions (setsid), so they outlive a call's 10-minute limit while back-to-back calls keep the machine
# warm; each call ends by packing what every job has written so far into $OUT.
#
#   call 1, carry .m1 (first GGUF part + the transformers wheel) and .whl:  PHASE=start bash benchmarks/gpu_session.sh
#       installs, then starts the fla family benchmark (no model needed)
#   call 2, sent at once, carry .m2 (the other parts + census/):         PHASE=jobs bash benchmarks/gpu_session.sh
#       assembles the model and starts the budget sweep (four processes over one run directory) and two
#       two-stage conversions (data, convert, evaluate, census)
#   later calls:                                                         PHASE=wait LIMIT=S bash benchmarks/gpu_session.sh
#       waits S seconds or until every job ended; PHASE=finish also assembles the budget tables
# Files into $OUT (at most 8): families.tgz, budget.tgz, conv1.tgz, conv2.tgz, logs.tgz and each conversion's tar.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
T0=$(date +%s); LIMIT=${LIMIT:-560}; PHASE=${PHASE:-wait}
W=/tmp/w; M=/tmp/model/smollm2.gguf; mkdir -p $W/logs /tmp/model
export PYTHONPATH=/tmp/ap:/tmp/site
job() {  # job NAME COMMAND...: a process session of its own (its id in logs/NAME.pid), output logs/NAME.txt, exit logs/NAME.rc
  local name=$1; shift
  setsid nohup bash -c "$*; echo \$? > $W/logs/$name.rc" > $W/logs/$name.txt 2>&1 < /dev/null &
  echo $! > $W/logs/$name.pid
}
# by the recorded ids, not by matching command lines (a pattern also matches the shell of the call that asks)
running() { for f in $W/logs/*.pid; do [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && return 0; done; return 1; }
stop() { for f in $W/logs/$1*.pid; do [ -f "$f" ] && kill -- -"$(cat "$f")" 2>/dev/null; done; }
pack() {
  cd $W || return
  for d in families budget conv1_out conv2_out logs; do
    [ -e $d ] && tar -czf $OUT/${d%_out}.tgz --exclude='conversions-*.tar' $d  # whole run directories: they resume here
  done
  for c in conv1_out/conversions-*.tar conv2_out/conversions-*.tar; do [ -f "$c" ] && cp "$c" $OUT/$(dirname $c)-$(basename $c); done
  ls -la $OUT; tail -n 3 $W/logs/*.txt
}
if [ "$PHASE" = start ]; then
  cp .m1/part00 /tmp/model/ && mkdir -p /tmp/whl && cp .m1/*.whl /tmp/whl/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl /tmp/whl/*.whl || exit 4
  rm -rf /tmp/ap; python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/ap . || exit 4
  cp -r benchmarks /tmp/bench  # the jobs read these, not the next call's copy of the tree
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > $W/logs/gpu.txt
  job families python3 /tmp/bench/gpu_families.py --out $W/families --lengths 2048 8192 32768
  sleep 20; pack; exit 0
fi
if [ "$PHASE" = jobs ]; then
  cp .m2/part0* /tmp/model/ && cat /tmp/model/part0* > $M || exit 3
  sha256sum $M | grep -q ^b179c952 || { echo BADHASH; exit 3; }
  cp -r .m2/census $W/census
  AP="python3 -m attnprobe.analyses.cli --device cuda budget --model $M --from $W/census --out $W/budget --chunk 512 --lengths 1024,2048,4096"
  DUO="--kinds sink+window:sinks=64,window=256"
  # one run directory: cells are files of their own, each process runs its own selectors (the references run in each)
  job budget-duo-retrieval $AP $DUO --selectors duo,retrieval
  job budget-razor-fit $AP $DUO --selectors razor,fit --sparse "''"
  job budget-random $AP $DUO --selectors random --seeds 3 --sparse "''"
  job budget-hedgehog $AP --kinds hedgehog --selectors razor,fit --budgets 0.25,0.5,0.75 --sparse "''"
  CONVERT="python3 /tmp/bench/gpu_convert.py --model $M --part data,convert,evaluate,census --tokens 2M"
  job conv1 $CONVERT --rows all-gla,all-decay --work $W/conv1 --out $W/conv1_out
  # the second conversion reads the first's sampled training data (same cache) once it exists
  job conv2 "until grep -q '\"kind\": \"data\"' $W/conv1_out/results.jsonl 2>/dev/null; do sleep 5; done;" \
      ATTNPROBE_CACHE=$W/conv1/cache $CONVERT --rows all-deltanet,sink+window+gdn --work $W/conv2 --out $W/conv2_out
fi
if [ "$PHASE" = finish ]; then
  while running && [ $(( $(date +%s) - T0 )) -lt $(( LIMIT - 90 )) ]; do sleep 5; done
  stop budget; sleep 3
  timeout 80 python3 -m attnprobe.analyses.cli --device cuda budget --model $M --from $W/census --out $W/budget --chunk 512 \
    --lengths 1024,2048,4096 --kinds "sink+window:sinks=64,window=256;hedgehog" --time-limit 0 > $W/logs/budget-assemble.txt 2>&1
fi
while running && [ $(( $(date +%s) - T0 )) -lt "$LIMIT" ]; do sleep 5; done
pack
