#!/usr/bin/env bash
# The main session's GPU driver (benchmarks/RESULTS.md says which session ran what). Jobs run as their own
# process sessions (setsid), so they outlive a call's 10-minute limit while back-to-back calls keep the machine
# warm; each call ends by packing what every job has written so far into $OUT.
#
#   call 1, carry .m1 (first GGUF part + the transformers wheel) and .whl:  PHASE=start bash benchmarks/gpu_session.sh
#       installs, then starts the fla family benchmark (no model needed)
#   call 2, sent at once, carry .m2 (the other parts):                    PHASE=jobs bash benchmarks/gpu_session.sh
#       assembles the model, samples the training data once (shared through one cache), then runs the
#       two-stage conversions: the new families at 2M tokens (convert, evaluate, census on the GPU) and the
#       20M-token rows in four lanes over one run directory (convert only; evaluated where they come back)
#   later calls:                                                         PHASE=wait LIMIT=S bash benchmarks/gpu_session.sh
#       waits S seconds or until every job ended
# $OUT gets pack.tgz.NN: one tar.gz in pieces of 16 MB (at most 8 come back), in order of worth: logs and
# results first, then the finished conversions, then what an unfinished 20M row needs to resume (the sampled
# data and its last checkpoint). A prefix of the pieces unpacks: cat pack.tgz.* | tar -xzf - (ignore the end).
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
pack() {
  cd $W || return
  rm -f $OUT/pack.tgz.*
  # finished rows' checkpoints are not needed (their conversions-N.tar holds fit and adapters)
  ckpt=$(for d in w14/run/conversions/*/; do [ -f "$d/conversion.json" ] || ls "$d"checkpoint* 2>/dev/null; done)
  tar -czf - --ignore-failed-read logs families conv15a conv15b lane_? \
      $(ls -d w15a/run/variants w15a/run/census w15b/run/variants w15b/run/census 2>/dev/null) \
      $(ls -d cache/samples 2>/dev/null) $ckpt 2>/dev/null | split -b 16000000 -d -a 2 - $OUT/pack.tgz.
  ls -la $OUT; tail -n 2 $W/logs/*.txt
}
if [ "$PHASE" = start ]; then
  cp .m1/part00 /tmp/model/ && mkdir -p /tmp/whl && cp .m1/*.whl /tmp/whl/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl /tmp/whl/*.whl || exit 4
  rm -rf /tmp/ap; python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/ap . || exit 4
  cp -r benchmarks /tmp/bench  # the jobs read these, not the next call's copy of the tree
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > $W/logs/gpu.txt
  python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)" >> $W/logs/gpu.txt 2>&1
  job families python3 /tmp/bench/gpu_families.py --out $W/families --lengths 2048 8192 32768
  sleep 20; pack; exit 0
fi
if [ "$PHASE" = jobs ]; then
  cp .m2/part0* /tmp/model/ && cat /tmp/model/part0* > $M || exit 3
  sha256sum $M | grep -q ^b179c952 || { echo BADHASH; exit 3; }
  export ATTNPROBE_CACHE=$W/cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  CONVERT="python3 /tmp/bench/gpu_convert.py --model $M --sample-batch 2048"
  # the data once: the 2M rows' windows first (2 epochs), then the 20M rows' (4 epochs; the shards are shared)
  job data "$CONVERT --part data --tokens 2M --work $W/w15a --out $W/data15 && touch $W/data15.ok &&" \
      "$CONVERT --part data --tokens 20M --epochs 4 --work $W/w14 --out $W/data14 && touch $W/data14.ok"
  after() { echo "until [ -f $W/$1.ok ]; do sleep 5; done;"; }
  C15="$CONVERT --part data,convert,evaluate,census --tokens 2M"
  job conv15a "$(after data15) $C15 --rows all-gla,all-decay --work $W/w15a --out $W/conv15a"
  job conv15b "$(after data15) $C15 --rows sink+window+gdn,all-kda --work $W/w15b --out $W/conv15b"
  # one run directory, one row per process at a time; lane a converts the control first
  C14="$(after data14) $CONVERT --part data,convert --tokens 20M --epochs 4 --work $W/w14"
  job lane_a "$C14 --rows all-hedgehog --out $W/lane_a"
  job lane_b "$C14 --no-control --rows layers-1of2-softmax,window+linear --out $W/lane_b"
  job lane_c "$C14 --no-control --rows layers-1of4-softmax --out $W/lane_c"
  job lane_d "$C14 --no-control --rows sink+window+linear --out $W/lane_d"
  sleep 30
fi
while running && [ $(( $(date +%s) - T0 )) -lt "$LIMIT" ]; do sleep 5; done
pack
