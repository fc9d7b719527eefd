"""Conversion throughput: the stage-2 matrix on random weights in a model's shape (the GPU benchmark), the
CPU conversion, and the one FLOP count (MFU) every conversion benchmark uses.

    python benchmarks/convert_bench.py --matrix OUT [--models smollm2,qwen] [--rows control,all-gated-deltanet,...]
        [--lengths 512,2048,8192] [--paths old,new] [--tokens-per-step 65536] [--micro-tokens 16384] [--steps 4]

--matrix times stage-2 optimizer steps of each (model, row, length, path) alone on the device, on random
tokens through random weights in the model's shape (SmolLM2-135M, Qwen2.5-0.5B; `tiny` for tests):
tokens/s, MFU, peak memory and the share of step time by phase (teacher forward, student forward, loss,
backward, optimizer; the device is synchronised between phases). Rows: control (no head replaced), all-K
for any registered kernel K, sink+window+gdn, softmax-12.5 (1 head in 8 of each layer softmax, rounded up,
the rest Gated DeltaNet). Paths: old (full-vocabulary logits, fp32 weights under autocast: stage 2 as it
was) and new (`conversion.stage2.FastPath()`, the conversion's default). Each row is appended to
OUT/convert_bench.jsonl as soon as it is measured; a row that runs out of memory runs again at half the
micro-batch (down to one sequence per forward; `micro_batch` in the record says what ran), --profile adds one
step under torch.profiler per row.

    python benchmarks/convert_bench.py [--model PATH] [--kernel hedgehog] [--length 128] [--batch 4] [--steps 4]
        [--recompute-layers | --memory]

Converts every head of a model (default: a tiny random Llama with a trained BPE tokenizer, built on the
spot) with --kernel (none: the control) through both stages on user text, and prints stage-1 and stage-2
tokens/s and the process's peak resident memory. --memory runs the same conversion twice, in two fresh
processes, with stage 2 keeping its activations and with --recompute-layers, and prints both peaks.

MFU (the one definition; RESULTS.md uses it): model FLOPs per trained stage-2 token = 2N (teacher forward)
+ 6N (student forward and backward, the PaLM convention) + the attention terms at the sequence length T,
where N counts the linear-layer weights (attention, MLP, LM head) and a causal softmax attention forward
costs 2 x T x head_dim per head and layer (QK^T and PV over T/2 keys on average), counted once for the
teacher and three times for the student. The count is the original model's for every row (a row whose
kernels are cheaper than softmax gets its credit in tokens/s, not in the count), recomputation is not
counted, and the peak is 989 TFLOP/s (dense bf16, one H100/H200 SXM). With frozen weights the work
actually needed is closer to 2N + 4N, which `needed` reports.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

H200_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of one H200 (SXM)


def forward_flops_per_token(n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn: int,
                            vocab: int, length: int) -> float:
    attention_weights = d_model * head_dim * (2 * n_heads + 2 * n_kv_heads)  # q, o and k, v
    linear = n_layers * (attention_weights + 3 * d_model * ffn) + d_model * vocab
    attention = n_layers * n_heads * 2 * length * head_dim
    return 2 * linear + attention


def stage2_flops_per_token(config, length: int) -> dict:
    """Model FLOPs per stage-2 token of an HF config: {"forward", "mfu_count" (PaLM), "needed"}."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    forward = forward_flops_per_token(text.num_hidden_layers, text.hidden_size, heads,
                                      getattr(text, "num_key_value_heads", None) or heads,
                                      getattr(text, "head_dim", None) or text.hidden_size // heads,
                                      text.intermediate_size, text.vocab_size, length)
    return {"forward": forward, "mfu_count": 4 * forward, "needed": 3 * forward}


def mfu(tokens_per_s: float, config, length: int) -> float:
    return tokens_per_s * stage2_flops_per_token(config, length)["mfu_count"] / H200_BF16_PEAK


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                       rope_theta=100000.0, tie_word_embeddings=True)


def qwen_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=True)


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


SHAPES = {"smollm2": smollm2_config, "qwen": qwen_config, "tiny": tiny_config}


def _paths() -> dict:
    """Stage 2 as it was, then one change at a time, then the conversion's default (and liger's loss instead of ours):
    {name: (the FastPath, whether the gated families' chunked forms run chunk after chunk as they did)}."""
    from attnprobe.analyses.conversion.stage2 import FastPath

    unfused = {"fused_ops": False}
    return {"old": (FastPath.old(), True), "+chunked-loss": (FastPath(bf16_weights=False, **unfused), True),
            "+bf16-weights": (FastPath(**unfused), True), "+batched-forms": (FastPath(**unfused), False),
            "eager-loss": (FastPath(compiled_loss=False), False), "new": (FastPath(), False),
            "liger-loss": (FastPath(loss="liger"), False)}


@contextmanager
def looped_forms(enabled: bool):
    """The scalar-decay and delta-rule chunked forms as they were before every chunk ran at once: one chunk after
    another (what the old path trained through beyond the quadratic range)."""
    from attnprobe.kernels.deltanet import kernel as delta
    from attnprobe.kernels.gla import chunk as forms

    def scalar(q, k, v, log_alpha, chunk):
        return forms.chunked(q, k, v, log_alpha, None, chunk)

    def wy(q, k, v, beta, log_alpha, chunk):
        state, outputs = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1]), []
        for start in range(0, q.shape[2], chunk):
            part = slice(start, start + chunk)
            o, state = delta.wy_chunk(q[:, :, part], k[:, :, part], v[:, :, part], beta[:, :, part], log_alpha[:, :, part], state)
            outputs.append(o)
        return torch.cat(outputs, dim=2), state

    saved = forms.scalar_chunked, delta.wy_chunked
    if enabled:
        forms.scalar_chunked, delta.wy_chunked = scalar, wy
    try:
        yield
    finally:
        forms.scalar_chunked, delta.wy_chunked = saved


PATHS = _paths()
ROWS = ("control", "all-gated-deltanet", "all-kda", "all-hedgehog", "sink+window+gdn", "softmax-12.5")


class _RandomTokenizer:  # all `describe` needs
    bos_token_id = 1

    def __call__(self, text):
        return type("Encoding", (), {"input_ids": [1, 2]})()


def random_model(shape: str, device: str):
    """A Model with random fp32 weights in `shape`'s configuration (as the conversion loads its models)."""
    from transformers import AutoModelForCausalLM

    from attnprobe.hooks.model import Model, describe

    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(SHAPES[shape](), dtype=torch.float32).eval()
    tokenizer = _RandomTokenizer()
    return Model(hf, tokenizer, describe(hf, tokenizer, f"random-{shape}", "random", "random"))


def row_heads(row: str, n_layers: int, n_heads: int) -> tuple[str | None, dict[int, list[int]]]:
    """(kernel, {layer: replaced heads}) of a benchmark row."""
    if row == "control":
        return None, {}
    if row == "softmax-12.5":
        kept = math.ceil(n_heads / 8)
        return "gated-deltanet", {layer: list(range(kept, n_heads)) for layer in range(n_layers)}
    kernel = row.removeprefix("all-")
    return kernel, {layer: list(range(n_heads)) for layer in range(n_layers)}


class PhaseClock:
    """Seconds per phase of a step, the device synchronised at each boundary (so each phase owns its kernels)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.last = device, {}, 0.0

    def start(self) -> None:
        self._sync()
        self.last = time.perf_counter()

    def mark(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def stage2_row(model, backend, row: str, length: int, path: str, tokens_per_step: int, micro_tokens: int, steps: int,
               recompute: bool, profile: Path | None = None) -> dict:
    """Time `steps` stage-2 optimizer steps (after one untimed warm-up step) of one row on random tokens;
    with `profile`, one more step under torch.profiler, its tables written there (`write_profile`)."""
    from attnprobe.analyses.conversion import train
    from attnprobe.analyses.conversion.stage2 import Stage2Step, frozen_in_bf16, fused_ops
    from attnprobe.kernels.registry import make_kernel

    device = model.device
    fast, looped = PATHS[path]
    fast = dataclasses.replace(fast, recompute_layers=recompute)
    info = model.info
    kernel, heads = row_heads(row, info.n_layers, info.n_heads)
    kernels = {layer: make_kernel(kernel, len(hs), info.head_dim).to(device) for layer, hs in heads.items()}
    batch, micro = max(1, tokens_per_step // length), max(1, min(tokens_per_step, micro_tokens) // length)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, info.vocab_size, (batch * (steps + 1), length), generator=generator)
    clock = PhaseClock(device)
    agreement = None
    with train.adapted(model, "lora", 8) as adapters, frozen_in_bf16(model.hf, fast.bf16_weights and device.type == "cuda"), \
            fused_ops(model.hf, fast.fused_ops) as fused, looped_forms(looped):
        params = [p for k in kernels.values() for p in k.parameters() if p.requires_grad] + list(adapters.values())
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        student = train.Student(model.hf, kernels, heads, length, hidden=fast.loss != "logits")
        with train.teacher_view(model, "lora") as teacher, \
                train.recomputed_layers(model.hf, backend) if recompute else nullcontext():
            step = Stage2Step(model.hf, backend, student.edits, teacher, fast, 0.0, autocast)

            def optimizer_step(rows: torch.Tensor, first: bool) -> None:
                nonlocal agreement
                clock.start()
                for piece in rows.split(micro):
                    piece = piece.to(device)
                    target = step.teacher(piece)
                    clock.mark("teacher forward")
                    out = step.student(student, piece)
                    clock.mark("student forward")
                    if first and fast.loss == "liger":  # the two losses measured against each other, untimed
                        agreement = _loss_agreement(step, out, target, piece)
                    loss = step.loss(out, target, piece) * (len(piece) / batch)
                    clock.mark("loss")
                    loss.backward()
                    del out, target, loss
                    clock.mark("backward")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                clock.mark("optimizer")

            for index in range(steps + 1):
                if index == 1:  # the first step pays for allocation and autotuning
                    clock.seconds = {}
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    began = time.perf_counter()
                optimizer_step(ids[index * batch:(index + 1) * batch], index == 0)
            seconds, phases = time.perf_counter() - began, dict(clock.seconds)
            if profile is not None:  # one more step, untimed, under torch.profiler
                write_profile(lambda: optimizer_step(ids[:batch], False), device, profile)
    tokens_per_s = steps * batch * length / seconds
    total = sum(phases.values())
    return {"row": row, "kernel": kernel, "length": length, "path": path, "batch": batch, "micro_batch": micro,
            "steps": steps, "recompute_layers": recompute, "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(mfu(tokens_per_s, model.hf.config, length), 4),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None,
            "phase_share": {phase: round(t / total, 4) for phase, t in phases.items()},
            "step_seconds": round(seconds / steps, 4), "train_forms": _train_forms(kernels, device, length),
            "fast_path": {**dataclasses.asdict(fast), "fused_ops": fused, "looped_forms": looped},
            **({"liger_vs_chunked": agreement} if agreement else {})}


def write_profile(run, device: torch.device, path: Path) -> None:
    """`run()` under torch.profiler: the operators by device time and by host time, and how busy the device was
    (the sum of its kernels' time over the wall time: a low share means the host, not the GPU, sets the pace)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    began = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - began
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6  # one stream: the kernels do not overlap
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(f"wall {wall:.3f} s, device kernels {busy:.3f} s ({busy / wall:.0%} busy)\n\n"
                    + events.table(sort_by=sort, row_limit=45, max_name_column_width=70) + "\n\n"
                    + events.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70))


def _loss_agreement(step, out, target, ids) -> dict:
    """liger-kernel's fused linear JSD (beta 0) against our chunked KL on one micro-batch: values, gradients."""
    from attnprobe.analyses.conversion.stage2 import chunked_distillation, liger_distillation

    leaf = out.detach().requires_grad_()
    values, grads = [], []
    for loss in (lambda h: liger_distillation(h, target, step.weight), lambda h: chunked_distillation(h, target, step.weight, ids)):
        with step.autocast():
            value = loss(leaf)
        grads.append(torch.autograd.grad(value, leaf)[0].float())
        values.append(float(value))
    return {"loss_liger": values[0], "loss_chunked": values[1],
            "grad_relative_difference": float((grads[0] - grads[1]).norm() / grads[1].norm().clamp_min(1e-30))}


def _train_forms(kernels, device, length: int) -> str | None:
    """Which form trains the row's kernels at `length` (fla, quadratic or chunked torch), as train_forward picks."""
    from attnprobe.kernels import fla
    from attnprobe.kernels.base import QUADRATIC_UP_TO

    if not kernels:
        return None
    kernel = next(iter(kernels.values()))
    like = torch.zeros(1, kernel.n_heads, 1, kernel.head_dim, device=device, dtype=torch.bfloat16)
    fla_prefills = getattr(kernel, "fla_prefills", lambda x: False)
    if fla_prefills(like) and fla.trains(kernel, like):
        return "fla"
    return "quadratic" if length <= QUADRATIC_UP_TO and getattr(kernel, "quadratic_trains", True) else "chunked torch"


def _refuse(message: str) -> None:
    """Bad input: one line naming the fix, exit status 2 (as the CLI does)."""
    sys.stderr.write(f"convert_bench: {message}\n")
    raise SystemExit(2)


def stage2_matrix(args) -> list[dict]:
    """Every (model, row, length, path) of the arguments, each row appended to OUT/convert_bench.jsonl."""
    from attnprobe.hooks.backends import make_backend

    from attnprobe.errors import AttnprobeError
    from attnprobe.kernels.registry import KERNELS

    unknown = [p for p in args.paths.split(",") if p not in PATHS] + [m for m in args.models.split(",") if m not in SHAPES] + \
        [r for r in args.rows.split(",") if r not in ("control", "softmax-12.5") and r.removeprefix("all-") not in KERNELS]
    if unknown:
        _refuse(f"unknown {', '.join(unknown)}: choose paths of {', '.join(PATHS)}; models of {', '.join(SHAPES)}; rows of "
                "control, softmax-12.5, all-K or K for a registered kernel K")
    lengths = [int(x) for x in args.lengths.split(",")]
    for shape in args.models.split(","):  # before anything runs
        window = SHAPES[shape]().max_position_embeddings
        if max(lengths) > window:
            _refuse(f"{shape} holds {window} positions, not {max(lengths)}: lower --lengths to at most {window}")
    out = Path(args.matrix)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = []
    for shape in args.models.split(","):
        model = random_model(shape, device)
        backend = make_backend("native", model)
        for length in lengths:
            for row in args.rows.split(","):
                for path in args.paths.split(","):
                    base = {"model": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
                    profile = out / f"profile-{shape}-{row}-{length}-{path}.txt" if args.profile else None
                    micro_tokens = args.micro_tokens
                    while True:  # out of memory: again at half the micro-batch, down to one sequence
                        try:
                            record = {**base, **stage2_row(model, backend, row, length, path, args.tokens_per_step,
                                                           micro_tokens, args.steps, args.recompute_layers, profile)}
                        except torch.OutOfMemoryError:
                            record = {**base, "row": row, "length": length, "path": path,
                                      "error": f"out of memory at {micro_tokens} tokens per forward"}
                        except AttnprobeError as error:  # e.g. liger's loss without liger-kernel: the other rows go on
                            record = {**base, "row": row, "length": length, "path": path, "error": str(error)}
                        if device == "cuda":
                            torch.cuda.empty_cache()
                        if not record.get("error", "").startswith("out of memory") or micro_tokens // 2 < length:
                            break
                        micro_tokens //= 2
                    records.append(record)
                    with open(out / "convert_bench.jsonl", "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    print(_line(record), flush=True)
        del model, backend
    return records


def _line(r: dict) -> str:
    head = f"{r['model']:<8} {r['row']:<19} T={r['length']:<5} {r['path']:<13}"
    if "error" in r:
        return f"{head} {r['error']}"
    shares = " ".join(f"{k.split()[0][:7]} {v:4.0%}" for k, v in r["phase_share"].items())
    memory = f"{r['peak_memory_gb']:6.1f} GB" if r["peak_memory_gb"] is not None else ""
    return f"{head} {r['tokens_per_s']:>10,.0f} tok/s  MFU {r['mfu']:6.1%}  {memory}  {shares}  [{r['train_forms']}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model spec (default: a tiny random Llama)")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--kernel", default="hedgehog", help="any registered kernel, or 'none' for the control")
    parser.add_argument("--recompute-layers", action="store_true")
    parser.add_argument("--memory", action="store_true", help="peak memory with and without --recompute-layers, side by side")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one line for --memory to read
    parser.add_argument("--matrix", metavar="OUT", help="the stage-2 matrix on random weights; rows appended to OUT/convert_bench.jsonl")
    parser.add_argument("--models", default="smollm2,qwen", help=f"shapes: {', '.join(SHAPES)}")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--paths", default="old,new", help=f"of {', '.join(PATHS)}: old = full logits, fp32 weights; "
                        "new = the conversion's default (+ fused RMSNorm/SwiGLU/RoPE where liger-kernel is installed)")
    parser.add_argument("--profile", action="store_true", help="--matrix: one more step per row under torch.profiler, "
                        "its tables in OUT/profile-MODEL-ROW-LENGTH-PATH.txt")
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--micro-tokens", type=int, default=16384, help="tokens per forward (gradient accumulation)")
    args = parser.parse_args()
    if args.memory:
        return memory_side_by_side(args)
    if args.matrix:
        stage2_matrix(args)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from attnprobe.analyses.conversion import train as conversion
    from attnprobe.analyses.conversion.data import training_data
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import load_model
    from attnprobe.probe import texts

    work = Path(tempfile.mkdtemp())
    if args.model is None:
        from tiny_hf import tiny_model_dir

        args.model = str(tiny_model_dir(work))
    model = load_model(args.model, device="cpu")
    backend = make_backend("native", model)
    (work / "train.txt").write_text(texts.prose())
    tokens = args.steps * args.batch * args.length
    kernel = None if args.kernel == "none" else args.kernel
    config = conversion.ConvertConfig(kernel=kernel, length=args.length, batch=args.batch, transfer_tokens=tokens,
                                      tokens=tokens, checkpoint_every=10 ** 9)
    data = training_data(model, 2 * tokens, args.length, [work / "train.txt"])
    seconds: dict[str, list[float]] = {"transfer": [], "end_to_end": []}
    last = [time.perf_counter()]

    def on_step(report):
        now = time.perf_counter()
        seconds[report.stage].append(now - last[0])
        last[0] = now

    heads = {layer: list(range(model.info.n_heads)) for layer in range(model.info.n_layers)} if kernel else {}
    manifest = conversion.convert(model, backend, heads, config, data, work / "run", on_step=on_step,
                                  recompute_layers=args.recompute_layers)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if args.json:
        print(json.dumps({"peak_mb": peak_mb, "stage2_losses": manifest["losses"]["end_to_end"],
                          "stage2_seconds": sum(seconds["end_to_end"])}))
        return
    per_step = args.batch * args.length
    print(f"model {args.model}: {model.info.n_layers} layers x {model.info.n_heads} heads, T = {args.length}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    for stage, times in seconds.items():
        steady = times[1:] or times  # the first step pays for allocation
        print(f"  {stage:<11} {per_step * len(steady) / sum(steady):8.0f} tokens/s ({len(times)} steps)")
    print(f"  peak resident memory {peak_mb:,.0f} MB{' (layers recomputed)' if args.recompute_layers else ''}")
    for length in (512, 1024, 2048):
        flops = stage2_flops_per_token(smollm2_config(), length)
        print(f"SmolLM2 shape, T = {length}: forward {flops['forward'] / 1e6:.0f} MFLOP/token, stage 2 "
              f"{flops['mfu_count'] / 1e9:.2f} GFLOP/token (MFU count), 30 % of an H200 = "
              f"{0.3 * H200_BF16_PEAK / flops['mfu_count']:,.0f} tokens/s")


def memory_side_by_side(args) -> None:
    """The conversion in two fresh processes (a peak resident set only grows): activations kept, then recomputed."""
    runs = {}
    for recompute in (False, True):
        command = [sys.executable, __file__, "--json", "--kernel", args.kernel, "--length", str(args.length),
                   "--batch", str(args.batch), "--steps", str(args.steps)] + (["--model", args.model] if args.model else [])
        output = subprocess.run(command + (["--recompute-layers"] if recompute else []), check=True,
                                capture_output=True, text=True).stdout
        runs[recompute] = json.loads(output.strip().splitlines()[-1])
    kept, redone = runs[False], runs[True]
    same = all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(kept["stage2_losses"], redone["stage2_losses"]))
    print(f"kernel {args.kernel}, T = {args.length}, batch {args.batch}, {args.steps} steps per stage, fp32 on the CPU")
    print(f"  activations kept:       peak {kept['peak_mb']:8,.0f} MB, stage 2 {kept['stage2_seconds']:6.1f} s")
    print(f"  layers recomputed:      peak {redone['peak_mb']:8,.0f} MB, stage 2 {redone['stage2_seconds']:6.1f} s")
    print(f"  peak ratio {redone['peak_mb'] / kept['peak_mb']:.2f}; stage-2 losses {'equal' if same else 'DIFFER'}: "
          f"{kept['stage2_losses']} / {redone['stage2_losses']}")


if __name__ == "__main__":
    main()
