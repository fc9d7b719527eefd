"""Key-value recall: n lines 'word: 4-digit number', then 'Repeat the line of the key word.' with the
answer started as 'word:'.

The request is the user's turn of the chat template where the tokenizer has one (SmolLM2-135M
answers 0.27 of bare 'word:' completions but about 0.9 of these, see README), plain text otherwise.
The queried pair is drawn among those whose line ends at least `BEYOND_WINDOW` tokens before the
request, so a windowed hybrid cannot read it from its window. `length` is the number of pairs, the
depth where the queried pair sits in the list (0-1)."""
from __future__ import annotations

from attnprobe.errors import AttnprobeError
from attnprobe.analyses.tasks import pools
from attnprobe.analyses.tasks.prompts import BEYOND_WINDOW, encode, first_number
from attnprobe.analyses.tasks.registry import Sample, Task, rng_for
from attnprobe.probe.retrieval import wrap_prompt


def build(n, length, seed, tokenizer, window, setting):
    rng, samples = rng_for("kv_recall", seed, length), []
    intro = encode(tokenizer, "Memorize this list of keys and values.\n")
    for index in range(n):
        keys, values = pools.draw("word", length, rng), pools.draw("number", length, rng, digits=4)
        lines = [encode(tokenizer, f"{k}: {v}\n") for k, v in zip(keys, values)]
        body = intro + [t for line in lines for t in line]
        ends = [len(intro) + sum(map(len, lines[:i + 1])) for i in range(length)]
        far = [i for i, end in enumerate(ends) if len(body) - end >= BEYOND_WINDOW]
        if not far:
            raise AttnprobeError(f"{length} key-value pairs span fewer than {BEYOND_WINDOW} tokens: use more pairs (at least 16)")
        asked = rng.choice(far)
        prompt, _ = wrap_prompt(tokenizer, body, f"\nRepeat the line of the key {keys[asked]}.", "auto", setting.bos,
                                reply=f"{keys[asked]}:")
        samples.append(Sample(prompt, (values[asked],), {"depth": asked / max(length - 1, 1), "sample": index}))
    return samples


def score(sample: Sample, response: str) -> bool:
    return first_number(response) == sample.answers[0]


TASKS = (Task("kv_recall", "kv_recall", "KV recall", build=build, score=score,
              scoring="correct when the first number generated is the key's value (exact)",
              description="word: number lines, one key's line asked for", sizes=("kv_pairs", "kv_samples", None),
              length_unit="pairs", max_new_tokens=8, stop_at_newline=True),)
