#!/usr/bin/env bash
# The main session's GPU driver (benchmarks/RESULTS.md says which session ran what). Jobs run as their own
# process sessions (setsid), so they outlive a call's 10-minute limit while back-to-back calls keep the machine
# warm; each call ends by packing what every job has written so far into $OUT.
#
#   call 1, carry .m1 (first GGUF part + the transformers wheel) and .whl:  PHASE=start bash benchmarks/gpu_session.sh
#   call 2, carry .m2 (the other GGUF parts):                             PHASE=model bash benchmarks/gpu_session.sh
#   call 3, carry .m3 (what the 20M rows resume from: the sampled data, the finished control, checkpoints):
#                                                                         PHASE=jobs bash benchmarks/gpu_session.sh
#       starts four lanes of 20M-token conversions over one run directory (convert only; they are evaluated
#       where they come back) and the new families at 2M tokens (convert, evaluate, census), every stage 2 with
#       --recompute-layers (the OOMs of 2026-12-02: seven processes at 25-72 GB each on one card)
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
resumable() {  # each unfinished row's checkpoint.json and the tensors it names, copied as one consistent pair
  rm -rf $W/resume
  for d in $W/w14/run/conversions/*/; do
    [ -f "$d/checkpoint.json" ] && [ ! -f "$d/conversion.json" ] || continue
    for attempt in 1 2 3; do  # a checkpoint written meanwhile replaces the pair: copy again
      local to=$W/resume/w14/run/conversions/$(basename $d); mkdir -p $to
      cp $d/checkpoint.json $to/ && name=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['tensors'])" $to/checkpoint.json) \
        && cp $d/$name $to/ 2>/dev/null && break
      rm -rf $to
    done
  done
}
pack() {
  cd $W || return
  rm -f $OUT/pack.tgz.*
  resumable
  tar -czf - --ignore-failed-read logs $(ls -d families conv15 lane_? 2>/dev/null) \
      $(ls -d w15/run/variants w15/run/census 2>/dev/null) $(ls -d cache/samples 2>/dev/null) \
      $(ls -d resume 2>/dev/null) 2>/dev/null | split -b 16000000 -d -a 2 - $OUT/pack.tgz.
  ls -la $OUT; tail -n 2 $W/logs/*.txt
}
if [ "$PHASE" = start ]; then
  cp .m1/part00 /tmp/model/ && mkdir -p /tmp/whl && cp .m1/*.whl /tmp/whl/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl /tmp/whl/*.whl || exit 4
  rm -rf /tmp/ap; python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/ap . || exit 4
  cp -r benchmarks /tmp/bench  # the jobs read these, not the next call's copy of the tree
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > $W/logs/gpu.txt
  python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)" >> $W/logs/gpu.txt 2>&1
  exit 0
fi
if [ "$PHASE" = model ]; then
  cp .m2/part0* /tmp/model/ && cat /tmp/model/part0* > $M || exit 3
  sha256sum $M | grep -q ^b179c952 || { echo BADHASH; exit 3; }
  exit 0
fi
if [ "$PHASE" = jobs ]; then
  [ -f $M ] || exit 3
  cp -r .m3/w14 .m3/cache $W/ || exit 3  # the run directory and the sampled windows (same sha256: dd8925e9)
  export ATTNPROBE_CACHE=$W/cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  C="python3 /tmp/bench/gpu_convert.py --model $M --sample-batch 2048 --recompute-layers"
  # one run directory, one row per process at a time; the control in it is finished (it came back in .m3)
  C14="$C --part data,convert --tokens 20M --epochs 4 --work $W/w14 --no-control"
  # a stage-2 step of batch 32 x 512 costs about 29,000 torch ops of host time (profile on the CPU): one process
  # leaves the card mostly idle, so the lanes run side by side (about 27,000 tokens/s each beside three others)
  job lane_a "$C14 --rows layers-1of2-softmax,all-hedgehog --out $W/lane_a"
  job lane_b "$C14 --rows layers-1of4-softmax --out $W/lane_b"
  job lane_c "$C14 --rows sink+window+linear --out $W/lane_c"
  job lane_d "$C14 --rows window+linear --out $W/lane_d"
  job conv15 "$C --part data,convert,evaluate,census --tokens 2M --rows all-gla,all-decay,sink+window+gdn --work $W/w15 --out $W/conv15"
  sleep 30
fi
while running && [ $(( $(date +%s) - T0 )) -lt "$LIMIT" ]; do sleep 5; done
pack
