"""Key-value retrieval (Liu et al. 2023, 'Lost in the Middle'; in RULER's suite): a JSON object of
UUID keys and UUID values filling the prompt, then one key; the model gives its value. The key asked
for lies at least `BEYOND_WINDOW` tokens before the question."""
from __future__ import annotations

from attnprobe.errors import AttnprobeError
from attnprobe.analyses.tasks import pools
from attnprobe.analyses.tasks.prompts import BEYOND_WINDOW, contains_all, encode
from attnprobe.analyses.tasks.registry import Sample, Task, rng_for
from attnprobe.probe.retrieval import wrap_prompt

INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"


def _prompt(tokenizer, lines, key, bos):
    body = encode(tokenizer, INTRO) + [t for line in lines for t in line] + encode(tokenizer, "}")
    return wrap_prompt(tokenizer, body, f'\nKey: "{key}"', "auto", bos, reply="Corresponding value:")[0]


def _one(tokenizer, length, rng, bos) -> tuple[list[int], str, float]:
    pairs, lines = [], []
    frame = len(_prompt(tokenizer, [], pools.draw("uuid", 1, rng)[0], bos))
    while True:
        key, value = pools.draw("uuid", 2, rng)
        line = encode(tokenizer, f'\n"{key}": "{value}",')
        if frame + sum(map(len, lines)) + len(line) > length - 4:  # a few tokens' room: keys tokenize unevenly
            break
        pairs.append((key, value))
        lines.append(line)
    ends = [sum(map(len, lines[:i + 1])) for i in range(len(lines))]
    far = [i for i, end in enumerate(ends) if ends[-1] - end >= BEYOND_WINDOW] if lines else []
    if not far:
        raise AttnprobeError(f"kv_retrieval at {length} tokens holds too few pairs: use lengths of at least 512 tokens")
    index = rng.choice(far)
    prompt = _prompt(tokenizer, lines, pairs[index][0], bos)
    while len(prompt) > length:  # drop pairs after the one asked for until it fits
        lines.pop()
        prompt = _prompt(tokenizer, lines, pairs[index][0], bos)
    return prompt, pairs[index][1], index / max(len(lines) - 1, 1)


def build(n, length, seed, tokenizer, window, setting):
    rng, samples = rng_for("kv_retrieval", seed, length), []
    for index in range(n):
        prompt, value, depth = _one(tokenizer, length, rng, setting.bos)
        samples.append(Sample(prompt, (value,), {"depth": depth, "sample": index}))
    return samples


def score(sample: Sample, response: str) -> bool:
    return contains_all(response, sample.answers)


TASKS = (Task("kv_retrieval", "kv_retrieval", "KV retrieval (UUIDs)", build=build, score=score,
              scoring="correct when the value (a UUID) appears in the response (case-insensitive substring)",
              description="a JSON object of UUID pairs, one key asked for", max_new_tokens=48),)
