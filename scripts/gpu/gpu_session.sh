#!/usr/bin/env bash
# The main session's GPU driver (benchmarks/RESULTS.md says which session ran what). Jobs run as their own
# process sessions (setsid), so they outlive a call's 10-minute limit while back-to-back calls keep the machine
# warm; each call ends by packing what every job has written so far into $OUT.
#
#   call 1, carry .m1 (first GGUF part + the transformers wheel) and .whl:  PHASE=start bash scripts/gpu/gpu_session.sh
#   call 2, carry .m2 (the other GGUF parts):                             PHASE=model bash scripts/gpu/gpu_session.sh
#       with DECODE=1 it then runs the decode benchmark alone on the card, eager beside CUDA graphs (sixth session)
#   call 3:                                                            PHASE=jobs bash scripts/gpu/gpu_session.sh
#       starts PHASE=plan as a process session of its own: the training windows of the 20M rows (8 passes over 3
#       shards of 2,048 samples, sha256 029a8d89, as in the seventh session), then two lanes side by side at
#       batch 128: ROWS_A (default sink+window+linear; empty skips the lane), and a 2M control (CONTROL=0 skips it)
#       followed by ROWS_B (default window+linear). In the seventh session the two
#       rows reached step 200 of 305 in 1,250 s beside each other, training through the T x T form; they now
#       train through the blocked prefill. One process at batch 128 peaks at 47.7 GiB; processes side by side
#       share one card's throughput rather than add to it
#   after a lost machine, carry .m3 (a pack's resume/ and cache/samples, unpacked here) in a call of its own:
#                                                                    PHASE=resume bash scripts/gpu/gpu_session.sh
#       then PHASE=jobs: each row resumes from its checkpoint, the windows are read, not sampled again
#   later calls:                                                         PHASE=wait LIMIT=S bash scripts/gpu/gpu_session.sh
#       waits S seconds or until every job ended
# $OUT gets pack.tgz.NN: one tar.gz in pieces of 16 MB (64 MiB of them come back per call), in order of worth:
# logs and results first, then the finished conversions, then each unfinished row's last checkpoint. A prefix of
# the pieces unpacks: cat pack.tgz.* | tar -xzf - (ignore the end).
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
  for d in $W/w128/run/conversions/*/; do
    [ -f "$d/checkpoint.json" ] && [ ! -f "$d/conversion.json" ] || continue
    for attempt in 1 2 3; do  # a checkpoint written meanwhile replaces the pair: copy again
      local to=$W/resume/w128/run/conversions/$(basename $d); mkdir -p $to
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
  # the sampled windows too (about 4 MB a shard): a lost machine then costs no resampling, only the carry back
  tar -czf - --ignore-failed-read logs $(ls -d lane_? data* resume cache/samples 2>/dev/null) 2>/dev/null \
      | split -b 16000000 -d -a 2 - $OUT/pack.tgz.
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
if [ "$PHASE" = resume ]; then  # carried back from an earlier machine: .m3/resume/w128 (checkpoints), .m3/cache/samples
  [ -d .m3/resume/w128 ] && mkdir -p $W/w128 && cp -r .m3/resume/w128/. $W/w128/
  [ -d .m3/cache/samples ] && mkdir -p $W/cache && cp -r .m3/cache/samples $W/cache/
  find $W/w128 $W/cache -name '*.json' -o -name 'shard-*' 2>/dev/null; exit 0
fi
if [ "$PHASE" = model ]; then
  cp .m2/part0* /tmp/model/ && cat /tmp/model/part0* > $M || exit 3
  sha256sum $M | grep -q ^b179c952 || { echo BADHASH; exit 3; }
  [ "${DECODE:-0}" = 1 ] || exit 0
  # decode cost alone on the card (nothing else running), eager steps beside CUDA-graph replays
  D="python3 /tmp/bench/decode_bench.py --model $M --device cuda --dtype bfloat16 --modes eager,graph"
  mkdir -p $OUT/decode
  timeout 250 $D --contexts 2048,32768 --out $OUT/decode/batch1 > $OUT/decode/batch1.txt 2>&1
  timeout 170 $D --contexts 32768 --batches 8 --architectures original,all-hedgehog,all-gated-deltanet --new-tokens 32 \
    --out $OUT/decode/batch8 > $OUT/decode/batch8.txt 2>&1
  exit 0
fi
C="python3 /tmp/bench/gpu_convert.py --model $M --sample-batch 2048 --recompute-layers"
if [ "$PHASE" = jobs ]; then
  [ -f $M ] || exit 3
  job plan "PHASE=plan bash /tmp/bench/gpu_session.sh"
  sleep 30
fi
if [ "$PHASE" = plan ]; then
  export ATTNPROBE_CACHE=$W/cache PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  C14="$C --tokens 20M --epochs 8 --batch 128 --no-control --work $W/w128"
  $C14 --part data --out $W/data20m > $W/logs/data20m.txt 2>&1 || exit 5  # sampled once, before the lanes read it
  ROWS_A=${ROWS_A-sink+window+linear}; ROWS_B=${ROWS_B-window+linear}
  [ -z "$ROWS_A" ] || job lane_a "$C14 --part data,convert --rows $ROWS_A --out $W/lane_a"
  # CONTROL=1 (default): first the control through the same stage 2 at 2M tokens (a tenth of a 20M control's time,
  # which the rows need; every earlier control, 2M or 20M, measured perplexity 16.32-16.33 against the original's
  # 16.33), in this lane: a third process beside the two rows ran out of the card's memory (ninth session)
  CONTROL_JOB="${C14/--no-control/} --tokens 2M --rows '' --work $W/w128c --part data,convert --out $W/lane_c;"
  [ "${CONTROL:-1}" = 1 ] || CONTROL_JOB=""
  job lane_b "$CONTROL_JOB $C14 --part data,convert --rows $ROWS_B --out $W/lane_b"
  exit 0
fi
while running && [ $(( $(date +%s) - T0 )) -lt "$LIMIT" ]; do sleep 5; done
pack
