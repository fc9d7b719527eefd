#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct on the GPU machine: its census to the full 32K window and the statistics pass.
#
# The machine has no network and keeps /tmp only while warm (30 s between calls), and a call carries 64 MiB:
# `python benchmarks/split_for_gpu.py` (here) cuts the GGUF into pieces under .m1 .. .mN and prints the calls.
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
set -uo pipefail
OUT=${OUT:-/tmp/qwen/out}
WORK=/tmp/qwen
export ATTNPROBE_CACHE=$WORK/cache PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
GGUF=$ATTNPROBE_CACHE/gguf/qwen2.5-coder-0.5b-instruct.gguf  # where attnprobe's embedded spec looks first
RUN=$WORK/run
LENGTHS=${LENGTHS:-2048,8192,16384,32640}
mkdir -p "$WORK" "$OUT" "$ATTNPROBE_CACHE/gguf"

tree() {  # this call's checkout as the attnprobe package (no build step: the image may lack setuptools' wheel)
  rm -rf /tmp/site/attnprobe && mkdir -p /tmp/site/attnprobe && cp -r hooks probe kernels analyses /tmp/site/attnprobe/
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
  if [ "$rc" -eq 124 ]; then echo "census stopped at its limit: resume it with a call of 'bash benchmarks/gpu_qwen.sh census'"; return 0; fi
  return "$rc"
}

stats() {
  [ $(( ${CALL_LIMIT:-600} - SECONDS )) -gt 240 ] || { echo "too little time left in this call: run 'stats' in a call of its own"; return 0; }
  python3 benchmarks/gpu_census.py --gguf "$GGUF" --dtype "${DTYPE:-bfloat16}" --lengths ${STATS_LENGTHS:-2048 8192 32768} \
    --eager-lengths ${EAGER_LENGTHS:-2048 4096 8192} --torch-path-max 8192 --out "$OUT/stats.json" 2>&1 | tee "$OUT/stats.log"
}

[ $# -gt 0 ] || { sed -n 2,18p "$0"; exit 2; }
for stage in "$@"; do
  case "$stage" in
    piece) piece || exit $? ;;
    setup|census|stats) tree && "$stage" || exit $? ;;
    *) echo "unknown stage '$stage': piece, setup, census or stats"; exit 2 ;;
  esac
done
