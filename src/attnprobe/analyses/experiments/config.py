"""The settings of the ablate, swap and budget commands (`AblateConfig`, `MatrixSizes`, `BudgetSizes`), importable
without torch: their `--help` and range checks answer before anything heavy is imported, loaded or written.

Each field with a help text (`metadata={"help": ...}`) is one command-line option (analyses/cli_options.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from attnprobe.errors import AttnprobeError
from attnprobe.kernels.names import KERNELS
from attnprobe.probe.config import WINDOW

MODES = ("zero", "mean", "uniform", "calibrate")  # ablation modes (experiments/ablation.py)
# the task registry's names for help texts, without importing it (analyses/tasks imports torch); names are checked
# against the registry itself, and tests/test_tasks.py holds this list equal to it
TASK_NAMES = ("passkey", "niah", "kv_recall", "copying", "niah_single_number", "niah_single_word", "niah_single_uuid",
              "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "kv_retrieval", "string_copy")
DEFAULT_TASKS = ("passkey", "kv_recall", "copying", "niah")  # the matrix's tasks unless --tasks says otherwise
SELECTORS = ("retrieval", "razor", "duo", "fit", "random")  # experiments/selectors.py
UNITS = ("kv", "head")
STREAMING = ("sink+window:sinks=4,window=64", "sink+window:sinks=64,window=256")  # today's and DuoAttention's
SPARSE = ("oracle-topk:k=256", "quest:page=16,pages=16", "vertical-slash:vertical=128,slash=128", "power:window=64")
BUDGETS = (0.0625, 0.125, 0.25, 0.5, 0.75)
TASKS = ("passkey", "niah")  # the default tasks of every budget cell


def _option(default, help: str, **extra):
    if isinstance(default, (list, dict, set)):
        raise TypeError("a mutable default: give a tuple")
    return field(default=default, metadata={"help": help, **extra})


def _flag(text: str, name: str) -> str:
    return f"--{name.replace('_', '-')} {text}"


def check_whole(config, names, low: int) -> None:
    """Each named field (a number or a sequence of numbers) holds whole numbers of at least `low`; sequences become tuples."""
    for name in names:
        value = getattr(config, name)
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if isinstance(value, (tuple, list)) and not value or any(isinstance(v, bool) or int(v) != v or v < low for v in values):
            raise AttnprobeError(_flag(f"takes whole numbers of at least {low}, got {list(values) if len(values) != 1 else values[0]}", name))
        if isinstance(value, (tuple, list)):
            setattr(config, name, tuple(int(v) for v in values))


def check_fractions(config, names) -> None:
    for name in names:
        values = tuple(getattr(config, name))
        if not values or any(not 0 <= d <= 1 for d in values):
            raise AttnprobeError(_flag(f"are fractions 0-1, got {list(values)}", name))
        setattr(config, name, tuple(float(d) for d in values))


def check_tasks(names, option: str = "tasks") -> None:
    """Every name a task of the registry; called after the range checks, since the registry imports torch."""
    if not names:
        raise AttnprobeError(f"--{option} names no recall task: choose from {', '.join(TASK_NAMES)}")
    if set(names) <= set(TASK_NAMES):
        return  # known without importing the registry (and torch)
    from attnprobe.analyses import tasks

    for name in names:
        tasks.task(name)


def check_choice(value: str, choices, name: str) -> None:
    if value not in choices:
        raise AttnprobeError(f"unknown --{name.replace('_', '-')} '{value}': choose one of {', '.join(choices)}")


@dataclass
class AblateConfig:
    """What the ablate command measures; the heads it ablates come from --heads/--layers (experiments/selection.py)."""

    mode: str = _option("uniform", "zero | mean | uniform (query zeroed, the retrieval-head paper's masking) | "
                                   "calibrate (ACT: hidden sinks get beta 0.4 of their weight)")
    task: str = _option("niah", "a recall task of the registry: " + ", ".join(TASK_NAMES))
    samples: int = _option(2, "samples per length and depth (niah in a sweep: every needle the census left out)")
    allow_small: bool = _option(False, "run with samples too few for a 95 % interval narrower than 0.5")
    lengths: tuple[int, ...] = _option((512, 1024), "NIAH / passkey context lengths in tokens")
    depths: tuple[float, ...] = _option((0.0, 0.5, 1.0), "needle depths (0-1)")
    seed: int = _option(0, "seed of random:K")
    sweep: tuple[int, ...] = _option((), "sweep top-K against random-K heads for these K, e.g. 5,10,20 (needs --from)")
    seeds: int = _option(10, "random draws per K in a sweep")
    exclude_top: Optional[int] = _option(None, "sweep: random heads come from outside the top N by --score (default 10 % of heads)")
    score: str = _option("retrieval_score", "heads.parquet column that ranks heads in a sweep")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AttnprobeError(f"unknown ablation mode '{self.mode}': choose one of {', '.join(MODES)}")
        check_tasks((self.task,), "task")
        if not self.lengths or any(int(n) != n or n < 16 for n in self.lengths):
            raise AttnprobeError(f"--lengths are context lengths, whole numbers of at least 16 tokens; got {list(self.lengths)}")
        self.lengths = tuple(int(n) for n in self.lengths)
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise AttnprobeError(f"--depths are fractions between 0 and 1; got {list(self.depths)}")
        self.depths = tuple(float(d) for d in self.depths)
        check_whole(self, ("seed",), 0)
        check_whole(self, ("seeds", "samples"), 1)
        if self.exclude_top is not None:
            check_whole(self, ("exclude_top",), 0)
        self.sweep = tuple(int(k) for k in self.sweep)  # their range needs the census: the command checks it


@dataclass
class MatrixSizes:
    """Sizes of each variant's evaluation. The defaults run on a 2-core CPU in a few minutes per
    variant (at least 12 samples per task and row: fewer give 95 % intervals over 0.5 wide and are
    refused unless `allow_small`); `gpu()` gives at least 100 samples per task and row, with passkey
    and NIAH to 4K. The swap command's options are built from these fields."""

    tasks: tuple[str, ...] = _option(DEFAULT_TASKS, "recall tasks of each row: " + ", ".join(TASK_NAMES))
    passkey_lengths: tuple[int, ...] = _option((512, 1024), "passkey context lengths in tokens")
    passkey_depths: tuple[float, ...] = _option((0.0, 0.25, 0.5, 0.75), "passkey depths (0-1; <= 0.75 keeps the key beyond a 64-token window)")
    passkey_samples: int = _option(2, "passkey samples per length and depth")
    kv_pairs: tuple[int, ...] = _option((16, 32), "key-value recall: pairs per prompt (the pair asked for lies beyond the hybrids' window)")
    kv_samples: int = _option(6, "key-value recall samples per number of pairs")
    copy_lengths: tuple[int, ...] = _option((64, 128), "copying: tokens per string (>= the hybrids' window)")
    copy_samples: int = _option(6, "copying strings per length")
    niah_lengths: tuple[int, ...] = _option((512, 1024), "NIAH context lengths (evaluation haystack)")
    niah_depths: tuple[float, ...] = _option((0.25, 0.75), "NIAH depths (0-1)")
    niah_needles: int = _option(4, "NIAH evaluation needles (packaged ones the default census does not rank with)")
    niah_haystack: Optional[str] = _option(None, "UTF-8 text file whose evaluation range gives the NIAH haystacks "
                                           "(default: the embedded prose, 8K tokens; a long file reaches a 32K window)")
    ruler_lengths: tuple[int, ...] = _option((1024,), "prompt lengths of the RULER tasks (niah_single_*, niah_multi*, "
                                             "variable_tracking, kv_retrieval, string_copy): 1K-8K for SmolLM2, 4K-32K for Qwen/Gemma")
    ruler_samples: int = _option(12, "samples per length of each RULER task")
    allow_small: bool = _option(False, "run with samples too few for a 95 % interval narrower than 0.5 (a smoke run)")
    perplexity_tokens: int = _option(2048, "held-out tokens for perplexity")
    perplexity_length: int = _option(WINDOW, "tokens per perplexity row (BOS counted), as the census's")
    bos: str = _option("auto", "one BOS convention for fitting, every task and each variant's census: auto | on | off")
    census: bool = _option(True, "re-run a small census on each modified model")
    census_lengths: tuple[int, ...] = _option((512, 1024), "NIAH lengths of that census")
    census_induction_length: int = _option(50, "period of that census's repeated random string for induction heads "
                                              "(a hybrid's exact window hides induction at shorter periods)")
    fit_tokens: int = _option(2048, "calibration tokens for the learnable kernels (those with parameters to fit)")
    fit_steps: int = _option(30, "Adam steps of attention transfer per layer")
    efficiency_contexts: tuple[int, ...] = _option((256, 1024), "contexts of the measured efficiency columns (GPU: 2048,8192,32768)")
    decode_tokens: int = _option(16, "decoded tokens per efficiency measurement")

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        check_whole(self, ("passkey_lengths", "kv_pairs", "copy_lengths", "niah_lengths", "ruler_lengths", "census_lengths",
                           "efficiency_contexts"), 1)
        check_fractions(self, ("passkey_depths", "niah_depths"))
        for name, low in (("passkey_samples", 1), ("kv_samples", 1), ("copy_samples", 1), ("niah_needles", 1), ("ruler_samples", 1),
                          ("perplexity_tokens", 2), ("perplexity_length", 2), ("fit_tokens", 1), ("fit_steps", 0),
                          ("decode_tokens", 1), ("census_induction_length", 2)):
            if getattr(self, name) < low:
                raise AttnprobeError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        check_choice(self.bos, ("auto", "on", "off"), "bos")
        check_tasks(self.tasks)
        if self.niah_haystack is not None:
            from attnprobe.probe import texts

            texts.prose(self.niah_haystack)  # a missing, binary or empty file fails here, before any fit

    @classmethod
    def gpu(cls, **given) -> "MatrixSizes":
        """GPU sizes: at least 100 samples per task and row (108 passkey, 102 key-value, 100 copying strings,
        120 NIAH, 102 per RULER task), passkey and NIAH at 1K-4K, RULER tasks at 1K, 4K and 8K, the efficiency
        columns at 2K, 8K and 32K (NaN past the model's window); sizes the user gave explicitly (`given`) are kept."""
        sizes = dict(passkey_lengths=(1024, 2048, 4096), passkey_samples=9, kv_pairs=(16, 32, 64), kv_samples=34,
                     copy_samples=50, niah_lengths=(1024, 2048, 4096), niah_depths=(0.1, 0.3, 0.5, 0.7, 0.9),
                     niah_needles=8, ruler_lengths=(1024, 4096, 8192), ruler_samples=34, perplexity_tokens=4096,
                     census_lengths=(1024, 2048), fit_tokens=8192, efficiency_contexts=(2048, 8192, 32768))
        return cls(**{**sizes, **given})

    @classmethod
    def quick(cls, **given) -> "MatrixSizes":
        """Tiny sizes for a smoke run, keeping each task's protocol (their intervals are too wide to mean
        anything: `allow_small`); sizes the user gave explicitly (`given`) are kept."""
        small = dict(passkey_lengths=(256,), passkey_depths=(0.5,), passkey_samples=1, kv_pairs=(16,), kv_samples=1,
                     copy_lengths=(64,), copy_samples=1, niah_lengths=(256,), niah_depths=(0.5,), niah_needles=1,
                     ruler_lengths=(512,), ruler_samples=1, allow_small=True, perplexity_tokens=512,
                     census_lengths=(128,), fit_tokens=256, fit_steps=2, efficiency_contexts=(64,), decode_tokens=4)
        return cls(**{**small, **given})


@dataclass
class DuoConfig:
    """DuoAttention's training recipe (its released defaults: lr 0.02, L1 weight 0.05, gates from 1,
    sink 64 + recent 256, 10 passkeys of 32 words in 1K-32K tokens, 2,000 steps) at sizes for this model."""

    lengths: tuple[int, ...] = (512, 1024, 2048)
    passkeys: int = 3
    passkey_words: int = 8
    steps: int = 100
    lr: float = 0.02
    reg_weight: float = 0.05
    sinks: int = 64
    window: int = 256
    seed: int = 0


def _kinds_help(what: str) -> str:
    return f"';'-separated {what}: KERNEL[:option=value,...] with KERNEL one of {', '.join(KERNELS)}"


@dataclass
class BudgetSizes:
    """What the sweep runs. Defaults are the GPU's full sizes for SmolLM2; `quick()` gives CPU sizes.
    The budget command's options are built from the fields with a help text."""

    budgets: tuple[float, ...] = _option(BUDGETS, "shares of units kept exact, each in (0, 1]")
    selectors: tuple[str, ...] = _option(SELECTORS, "head rankings: " + ", ".join(SELECTORS) + " (retrieval needs --from)")
    seeds: int = _option(3, "random draws (--quick: 2)")
    kinds: tuple[str, ...] = _option(STREAMING, _kinds_help("replacements of the other heads (a learnable kernel is fitted)"),
                                     separator=";")
    sparse: tuple[str, ...] = _option(SPARSE, _kinds_help("sparse rows, every head replaced (empty: none)"), separator=";")
    unit: str = _option("kv", "kv: rank KV heads (a KV head's cache is kept whole) | head: rank query heads")
    tasks: tuple[str, ...] = _option(TASKS, "recall tasks of every cell: " + ", ".join(TASK_NAMES))
    passkey_lengths: tuple[int, ...] = _option((1024, 2048, 4096), "passkey lengths in tokens (--quick: 128)")
    passkey_depths: tuple[float, ...] = _option((0.1, 0.5, 0.9), "passkey depths (0-1)")
    passkey_samples: int = _option(2, "passkey samples per length and depth")
    niah_lengths: tuple[int, ...] = _option((1024, 2048, 4096), "NIAH lengths in tokens (--quick: 128)")
    niah_depths: tuple[float, ...] = _option((0.1, 0.5, 0.9), "NIAH depths (0-1)")
    niah_needles: int = _option(2, "NIAH needles per length and depth")
    kv_pairs: tuple[int, ...] = _option((16, 32, 64), "key-value recall pairs per prompt (when --tasks names kv_recall)")
    kv_samples: int = _option(6, "key-value recall samples per number of pairs")
    copy_lengths: tuple[int, ...] = _option((64, 128), "copying: tokens per string (when --tasks names copying)")
    copy_samples: int = _option(6, "copying strings per length")
    ruler_lengths: tuple[int, ...] = _option((1024, 2048, 4096), "prompt lengths of the RULER tasks --tasks names")
    ruler_samples: int = _option(6, "samples per length of each RULER task")
    allow_small: bool = _option(False, "run with samples too few for a 95 % interval narrower than 0.5 per cell (a smoke run)")
    perplexity_tokens: int = _option(2048, "held-out tokens for perplexity")
    razor_length: int = _option(50, "length of RazorAttention's repeated random string")
    razor_batch: int = _option(10, "RazorAttention's repeated random strings")
    duo: DuoConfig = field(default_factory=DuoConfig)
    fit_tokens: int = _option(2048, "calibration tokens for the learnable kernels")
    fit_steps: int = _option(30, "Adam steps of attention transfer per layer")
    needle_samples: int = _option(6, "NIAH samples of the needle table (the share of the needle each sparse rule keeps)")
    chunk: int = _option(64, "query chunk of the replaced heads' prefill (512 is faster on a GPU)")

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise AttnprobeError(f"--budgets are shares of heads in (0, 1], e.g. 0.25; got {list(self.budgets)}")
        self.budgets = tuple(float(b) for b in self.budgets)
        for name, choices in (("selectors", SELECTORS),):
            unknown = [v for v in getattr(self, name) if v not in choices] or ([] if getattr(self, name) else ["(none)"])
            if unknown:
                raise AttnprobeError(f"unknown --{name} {', '.join(unknown)}: choose from {', '.join(choices)}")
        check_choice(self.unit, UNITS, "unit")
        for spec in (*self.kinds, *self.sparse):
            if spec.partition(":")[0].strip() not in KERNELS:
                raise AttnprobeError(f"unknown kernel '{spec.partition(':')[0].strip()}' in '{spec}': choose one of {', '.join(KERNELS)}")
        check_whole(self, ("passkey_lengths", "niah_lengths"), 16)
        check_fractions(self, ("passkey_depths", "niah_depths"))
        check_whole(self, ("seeds", "passkey_samples", "niah_needles", "razor_batch", "fit_tokens", "needle_samples", "chunk",
                           "kv_pairs", "kv_samples", "copy_lengths", "copy_samples", "ruler_lengths", "ruler_samples"), 1)
        check_whole(self, ("perplexity_tokens", "razor_length"), 2)
        check_whole(self, ("fit_steps",), 0)
        check_tasks(self.tasks)
        from attnprobe.analyses.tasks.pools import evaluation_needles  # the registry's package: after the light checks

        if self.niah_needles > len(evaluation_needles()):
            raise AttnprobeError(f"--niah-needles {self.niah_needles}: {len(evaluation_needles())} needles are kept for "
                                 f"evaluation; choose 1-{len(evaluation_needles())}")

    @classmethod
    def quick(cls, **overrides) -> BudgetSizes:
        small = {"seeds": 2, "passkey_lengths": (128,), "passkey_depths": (0.5,), "passkey_samples": 1, "niah_lengths": (128,),
                 "niah_depths": (0.5,), "niah_needles": 1, "perplexity_tokens": 256, "razor_length": 16, "razor_batch": 2,
                 "duo": DuoConfig(lengths=(128,), passkeys=1, passkey_words=2, steps=2, sinks=4, window=16),
                 "fit_tokens": 128, "fit_steps": 1, "needle_samples": 1, "allow_small": True, "kv_pairs": (16,),
                 "kv_samples": 1, "copy_lengths": (16,), "copy_samples": 1, "ruler_lengths": (512,), "ruler_samples": 1,
                 "sparse": ("oracle-topk:k=16", "quest:page=4,pages=4", "vertical-slash:vertical=8,slash=8,last=16",
                            "power:window=8")}
        return cls(**{**small, **overrides})

