"""Passkey retrieval: a 5-digit key hidden in repetitive filler of `length` tokens at a depth (0-1),
asked for in plain completion format ('... The pass key is')."""
from __future__ import annotations

from attnprobe.analyses.tasks import pools
from attnprobe.analyses.tasks.prompts import encode, first_number, noise_ids
from attnprobe.analyses.tasks.registry import Sample, Task, rng_for
from attnprobe.probe.retrieval import insertion_point, wrap_prompt

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
DEPTHS = (0.0, 0.5, 1.0)


def build(n, length, seed, tokenizer, window, setting):
    """Sample i sits at depth depths[i % len(depths)]: n = samples x depths covers each depth alike."""
    rng, depths, samples = rng_for("passkey", seed, length), setting.depths or DEPTHS, []
    filler = noise_ids(tokenizer, length)
    for index in range(n):
        depth = depths[index % len(depths)]
        key = pools.draw("number", 1, rng, digits=5)[0]
        at = insertion_point(tokenizer, filler, depth)
        needle = encode(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key.")
        body = encode(tokenizer, INTRO) + filler[:at] + needle + filler[at:]
        prompt, _ = wrap_prompt(tokenizer, body, "\nWhat is the pass key? The pass key is", "plain", setting.bos)
        samples.append(Sample(prompt, (key,), {"depth": depth, "sample": index // len(depths)}))
    return samples


def score(sample: Sample, response: str) -> bool:
    return first_number(response) == sample.answers[0]


TASKS = (Task("passkey", "passkey", "passkey", build=build, score=score,
              scoring="correct when the first number generated is the key (exact)",
              description="a 5-digit key in repeated filler", sizes=("passkey_lengths", "passkey_samples", "passkey_depths"),
              length_unit="filler tokens", max_new_tokens=8, grid=True, stop_at_newline=True),)
