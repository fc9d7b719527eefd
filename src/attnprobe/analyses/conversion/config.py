"""A conversion's recipe (`ConvertConfig`) and token counts, importable without torch: `attnprobe convert --help`
and the range checks answer before anything heavy is imported, loaded or written."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from attnprobe.errors import AttnprobeError

TRAIN_MODES = ("lora", "kernels", "attention")
SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}  # binary, everywhere a token count is read: 1M = 1,048,576


def parse_tokens(text: str) -> int:
    """'20M', '512K', '1.5M' or '1000' -> a token count; K, M, G are binary (1K = 1,024 tokens)."""
    text = str(text).strip().upper().replace("_", "").replace(",", "")
    try:
        number = float(text[:-1]) * SUFFIXES[text[-1]] if text and text[-1] in SUFFIXES else float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise AttnprobeError(f"cannot read a token count from '{text}': use a whole number >= 0, e.g. 100000, 512K or 20M "
                             "(K = 1,024 tokens, M = 1,048,576)")
    return int(number)


def format_tokens(count: int) -> str:
    """The shortest form `parse_tokens` reads back: 1048576 -> '1M'."""
    for suffix, size in reversed(SUFFIXES.items()):
        if count and count % size == 0:
            return f"{count // size}{suffix}"
    return str(count)


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ConvertConfig:
    """One conversion's recipe; everything here is recorded, and all but `accumulation` and `checkpoint_minutes`
    must match to resume.
    The convert command's options are built from the fields with a help text."""

    kernel: str | None = "hedgehog"  # None: the control (no head replaced)
    options: dict = field(default_factory=dict)
    length: int = _option(1024, "tokens per training sequence")
    window: int = _option(0, "tokens per data window; windows are packed side by side into sequences of --length "
                             "(a multiple of it). 0: --length itself")
    batch: int = _option(8, "sequences per optimizer step (all processes and accumulation steps together)")
    accumulation: int = _option(1, "gradient accumulation steps per optimizer step")
    transfer_tokens: int = _option(1 << 20, "stage-1 (attention transfer) token budget")
    tokens: int = _option(1 << 20, "stage-2 (end-to-end) token budget, e.g. 20M")
    transfer_lr: float = _option(1e-2, "stage-1 peak learning rate")
    lr: float = _option(1e-3, "stage-2 peak learning rate (warmup, then cosine)")
    warmup: float = _option(0.05, "share of each stage's steps spent warming the learning rate up (0-1)")
    min_lr: float = _option(0.1, "the cosine ends at this share of the peak learning rate (0-1)")
    train: str = _option("lora", "what stage 2 trains beside the kernels: " + " | ".join(TRAIN_MODES))
    lora_rank: int = _option(8, "rank of the LoRA adapters on q/k/v/o")
    ce_weight: float = _option(0.0, "weight of the next-token loss added to the KL")
    checkpoint_every: int = _option(50, "optimizer steps between checkpoints")
    checkpoint_minutes: float = _option(5.0, "also checkpoint whenever this many minutes have passed since the last "
                                             "checkpoint (0: only by steps)")
    seed: int = _option(0, "seed of the data order and the kernels' initialisation")

    def __post_init__(self) -> None:
        """Refuse impossible recipes before anything is loaded or written (a zero would end in a ZeroDivisionError)."""
        if self.train not in TRAIN_MODES:
            raise AttnprobeError(f"unknown --train '{self.train}': choose one of {', '.join(TRAIN_MODES)}")
        for name, low in (("length", 2), ("window", 0), ("batch", 1), ("accumulation", 1), ("lora_rank", 1),
                          ("checkpoint_every", 1), ("transfer_tokens", 0), ("tokens", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AttnprobeError(f"--{name.replace('_', '-')} must be a whole number of at least {low}, got {value!r}")
        if self.tokens + self.transfer_tokens <= 0:
            raise AttnprobeError("token budgets must be >= 0 and not both 0")
        for name, positive, high in (("lr", True, math.inf), ("transfer_lr", True, math.inf), ("warmup", False, 1),
                                     ("min_lr", False, 1), ("ce_weight", False, math.inf), ("checkpoint_minutes", False, math.inf)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)
                    and value <= high):
                bounds = ("above 0" if positive else "at least 0") + (f" and at most {high:g}" if math.isfinite(high) else "")
                raise AttnprobeError(f"--{name.replace('_', '-')} must be a number {bounds}, got {value!r}")
        self.check(1)

    def check_length(self, max_context: int) -> None:
        if self.length > max_context > 0:
            raise AttnprobeError(f"training sequences of {self.length} tokens exceed the model's window of {max_context}: "
                                 f"lower --length to at most {max_context}")

    def steps(self, tokens: int) -> int:
        return max(1, tokens // (self.batch * self.length))

    def check(self, world: int) -> None:
        """What needs the number of processes: the global batch splits evenly."""
        if self.batch % (self.accumulation * world):
            raise AttnprobeError(f"a batch of {self.batch} sequences does not split into {self.accumulation} accumulation steps "
                                 f"x {world} processes: make --batch a multiple of {self.accumulation * world}")
