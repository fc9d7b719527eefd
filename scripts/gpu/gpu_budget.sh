#!/usr/bin/env bash
# Issue 16 on one GPU: which heads must stay exact. `attnprobe budget` of SmolLM2 at full sizes: the
# selectors (census retrieval score, RazorAttention, DuoAttention gates, sink+window fit error, 3 random
# draws) x budgets 6.25/12.5/25/50/75 % of KV heads exact, the rest streaming (4 sinks + 64 window first,
# then DuoAttention's 64 + 256), plus the sparse rows (oracle top-k, Quest, vertical-slash, PowerAttention).
#
#   CENSUS=DIR MODEL=SPEC bash scripts/gpu/gpu_budget.sh
#
#   CENSUS  a census run directory with heads.parquet (carried in; the retrieval selector reads it)
#   MODEL   smollm2-135m or the path of its .gguf (default smollm2-135m)
#   RESUME  optional: a budget_run.tar.gz from an earlier call; its finished cells are not redone
#   LIMIT   seconds after which no new cell starts (default 330); HARD kills the sweep (default 480)
#   LENGTHS passkey and NIAH lengths (default 1024,2048,4096: SmolLM2 answered 2 of 4 passkeys at 8K in a CPU check)
#   DTYPE   float32 (default, as the census) or bfloat16; DEVICE cuda (default) or cpu
#   EXTRA   more `attnprobe budget` options, e.g. "--quick --selectors retrieval,random" (a CPU smoke run)
#
# Into $OUT as it goes: budget.log (one timed line per step). At the end: budget.parquet, rankings.parquet,
# overlap.parquet, needle_keep.parquet, manifest.json and budget_run.tar.gz (the whole run directory, cells
# included; pass it back as RESUME to finish a sweep the limit cut). 7 files.
set -uo pipefail
OUT=${OUT:-/tmp/budget/out}
WORK=/tmp/budget
RUN=$WORK/run
export PYTHONUNBUFFERED=1
mkdir -p "$WORK" "$OUT"
: "${CENSUS:?set CENSUS to a census run directory (with heads.parquet)}"
[ -f "$CENSUS/heads.parquet" ] || { echo "$CENSUS/heads.parquet not found: carry a census run directory in"; exit 2; }

if ! python3 -c "import attnprobe.analyses.experiments.budget" 2>/dev/null; then  # this checkout, without dependencies
  python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target /tmp/site . || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -n "${RESUME:-}" ] && [ ! -d "$RUN" ]; then tar -xzf "$RESUME" -C "$WORK" || exit 2; fi

start=$(date +%s)
timeout "${HARD:-480}" python3 -m attnprobe.analyses.cli --dtype "${DTYPE:-float32}" --device "${DEVICE:-cuda}" budget \
  --model "${MODEL:-smollm2-135m}" --from "$CENSUS" --out "$RUN" --time-limit "${LIMIT:-330}" --chunk 512 \
  --passkey-lengths "${LENGTHS:-1024,2048,4096}" --niah-lengths "${LENGTHS:-1024,2048,4096}" ${EXTRA:-} > "$OUT/budget.log" 2>&1
rc=$?
echo "rc=$rc wall=$(( $(date +%s) - start )) s" >> "$OUT/budget.log"
tail -40 "$OUT/budget.log"
for table in budget rankings overlap needle_keep; do
  [ -f "$RUN/$table.parquet" ] && cp "$RUN/$table.parquet" "$OUT/"
done
[ -f "$RUN/manifest.json" ] && cp "$RUN/manifest.json" "$OUT/"
tar -czf "$OUT/budget_run.tar.gz" -C "$WORK" run
if [ "$rc" -eq 124 ]; then echo "stopped at HARD: rerun with RESUME=budget_run.tar.gz to assemble and finish"; fi
exit "$rc"
