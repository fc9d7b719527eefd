#!/usr/bin/env bash
# Issues 42/43 on one GPU: SmolLM2 converted with retrieval-bearing data and a control that can move, at two stage-2
# budgets, head-level hybrids beside a pure recurrent row, evaluated at GPU sizes (>= 100 samples per task).
# SmolLM2's GGUF (98 MB) travels in two calls: `split -b 44000000 -d -a 2 GGUF part` here, part00 into .m1 beside
# nothing else, part01 and part02 into .m2 (each call's load stays under 64 MiB with the working tree and .whl):
#
#   call 1, carry .whl and .m1:  PHASE=start bash scripts/gpu/ladder.sh   (installs; then the GPU tests, T_S seconds, the
#                                decode matrix of issue 44 alone on the card, D_S seconds, and with G_S seconds Gated
#                                DeltaNet's stage-2 speed; 0 skips each)
#   call 2, carry .m2, at once:  PHASE=model bash scripts/gpu/ladder.sh   (assembles the model, starts the jobs, waits;
#                                carry .samples too, a copy of $ATTNPROBE_CACHE/samples from `convert --part data` run
#                                elsewhere with the same recipe, and the self-sampling is skipped)
#   later calls, back to back:   PHASE=wait bash scripts/gpu/ladder.sh
#
# Jobs (process sessions of their own, so they outlive a call): lane e converts the 2M rung (RUNG_A: the control,
# the hybrid, ROWS) and evaluates it; lane t converts the 10M rung (RUNG_B: the control, the hybrid, ROWS_B) and
# evaluates it; RETRIEVAL (default 0.25, 0 for the arm without) names both run folders (rRUNG-fRETRIEVAL). Each call
# waits until LIMIT seconds or
# the jobs' end, then packs logs, tables, finished conversions and unfinished rows' last checkpoints into
# $OUT/pack-T/pack.tgz.NN every 2 minutes (16 MB pieces, most valuable first): cat pack.tgz.* | tar -xzf -
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T0=$(date +%s); LIMIT=${LIMIT:-540}; PHASE=${PHASE:-wait}
W=/tmp/w; M=/tmp/model/smollm2.gguf; mkdir -p $W/logs /tmp/model
export PYTHONPATH=/tmp/ap:/tmp/site ATTNPROBE_CACHE=$W/cache
ROWS=${ROWS-all-gated-deltanet}; ROWS_B=${ROWS_B-}  # beside the control and the head-level hybrid (--selector)
RUNG_A=${RUNG_A:-2M}; RUNG_B=${RUNG_B:-10M}  # 10M: one self-sampled shard serves both rungs; RUNG_B=0: lane e alone
F=${RETRIEVAL:-0.25}  # share of training windows that are retrieval documents (0: none, the ladder's other arm)
A=$W/r$RUNG_A-f$F; B=$W/r$RUNG_B-f$F
# one recipe for every row and its control: 2,048-token sequences, 64K tokens a step, a next-token term, a quarter of
# the windows synthetic retrieval documents in both stages, the KV heads kept exact chosen by the census
RECIPE="--length 2048 --batch 32 --transfer-tokens 1M --epochs 16 --sample-batch ${SAMPLE_BATCH:-352} --ce-weight 0.1 --checkpoint-minutes 3"
RECIPE="$RECIPE --retrieval-fraction $F --retrieval-stages both --selector retrieval --from /tmp/census --kv-budget ${BUDGET:-12.5%}"
AP="python3 -m attnprobe.analyses.cli --device cuda convert --model $M $RECIPE"
EVAL="--part evaluate --gpu-sizes --tasks passkey,kv_recall,copying,niah"
job() {  # job NAME COMMAND...: its own process session; output logs/NAME.txt, exit status logs/NAME.rc
  local name=$1; shift
  setsid nohup bash -c "$*; echo \$? > $W/logs/$name.rc" > $W/logs/$name.txt 2>&1 < /dev/null &
  echo $! > $W/logs/$name.pid
}
running() { for f in $W/logs/*.pid; do [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && return 0; done; return 1; }
pack() {  # logs and tables first, then finished rows, then the last checkpoint of each unfinished row; a complete pack
  # replaces the last one, so a call cut short still returns the pack before it
  cd $W || return
  local small big to=$OUT/pack-$(date +%s)
  small=$(find logs r* -maxdepth 3 \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.parquet' -o -name '*.txt' \) 2>/dev/null)
  big=$(find r*/conversions -maxdepth 2 \( -name 'adapters.safetensors' -o -name 'fit' -o -name 'checkpoint*' \) 2>/dev/null)
  mkdir -p $to && tar -czf - --ignore-failed-read $small $big 2>/dev/null | split -b 16000000 -d -a 2 - $to/pack.tgz. \
    && for old in $OUT/pack-*; do [ "$old" = "$to" ] || rm -rf "$old"; done
  cd - > /dev/null
}
if [ "$PHASE" = start ]; then
  cp .m1/part* /tmp/model/ || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 4
  rm -rf /tmp/ap; python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/ap . || exit 4
  rm -rf /tmp/census; cp -r benchmarks/results/census-smollm2-cpu /tmp/census
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/machine.txt
  mkdir -p $OUT/logs
  [ "${T_S:-60}" = 0 ] || PYTHONPATH=$PWD/src:/tmp/site timeout "${T_S:-60}" python3 -m pytest -q -x tests/test_fla_gated_backward.py "tests/test_stage2.py::test_the_compiled_loss_equals_the_eager_one[0.3-2.0-cuda]" tests/test_decode_cuda.py \
    > $OUT/logs/gpu-tests.txt 2>&1
  [ "${D_S:-90}" = 0 ] || (cd benchmarks && PYTHONPATH=$PWD/../src:/tmp/site timeout "${D_S:-90}" python3 decode_bench.py \
    --shape smollm2 --device cuda --dtype bfloat16 --contexts 32768 --batches 1,8 --modes graph --out $OUT/decode --architectures \
    original,original-split-k,all-gated-deltanet,all-kda,heads-12.5-gated-deltanet,layers-1of4-softmax-gdn > $OUT/logs/decode.txt 2>&1)
  # G_S seconds: stage 2 of all-gated-deltanet in SmolLM2's shape (random weights), whose gated backward decides
  # whether the ladder's rungs fit (0 skips it)
  [ "${G_S:-0}" = 0 ] || (cd benchmarks && PYTHONPATH=$PWD/../src:/tmp/site timeout "$G_S" python3 convert_bench.py \
    --matrix $OUT/convert --models smollm2 --rows control,all-gated-deltanet --lengths 2048 --paths new,eager-loss \
    --micro-tokens 32768 > $OUT/logs/convert-gdn.txt 2>&1)
  tail -n 12 $OUT/logs/*.txt 2>/dev/null
  exit 0
fi
if [ "$PHASE" = model ]; then
  cp .m2/part* /tmp/model/ && cat /tmp/model/part* > $M || exit 3
  sha256sum $M | grep -q ^b179c952 || { echo BADHASH; exit 3; }
  # self-sample shards made beforehand on another machine (the data part's cache, same SAMPLE_BATCH) skip generation
  [ ! -d .samples ] || { mkdir -p $W/cache && cp -r .samples $W/cache/samples; }
  # the 2M rung's windows first (one shard of self-samples, shared), then both lanes
  $AP --tokens $RUNG_A ${ROWS:+--variants $ROWS} --part data --out $A > $W/logs/data.txt 2>&1 || { tail $W/logs/data.txt; exit 5; }
  # 32K tokens a forward for the long rung (Gated DeltaNet ran out of an H100's memory at 64K), 16K for the short one;
  # each lane evaluates its own rung; the original's row is the same model at the same sizes in both rungs:
  # evaluated once (lane e evaluates it first), copied
  # lane e: the control and the hybrid converted and evaluated before ROWS (a slow row cannot hold them back)
  job e "$AP --tokens $RUNG_A --part convert --accumulation 4 --out $A && $AP --tokens $RUNG_A $EVAL --out $A \
    ${ROWS:+&& $AP --tokens $RUNG_A --variants $ROWS --part convert --accumulation 4 --out $A \
    && $AP --tokens $RUNG_A --variants $ROWS $EVAL --out $A}"
  [ "$RUNG_B" = 0 ] || job t "$AP --tokens $RUNG_B ${ROWS_B:+--variants $ROWS_B} --part data,convert --accumulation 2 --out $B \
    && mkdir -p $B/variants && cp $A/variants/original.* $B/variants/; \
    $AP --tokens $RUNG_B ${ROWS_B:+--variants $ROWS_B} $EVAL --out $B"
fi
LAST=$(date +%s)
while running && [ $(( $(date +%s) - T0 )) -lt "$LIMIT" ]; do
  sleep 5
  [ $(( $(date +%s) - LAST )) -lt 120 ] || { pack; LAST=$(date +%s); }
done
pack
ls -la $OUT/pack-*; tail -n 3 $W/logs/*.txt
