"""String copying by generation: a list of evaluation-side words after 'WORDS:' in the noise haystack,
beyond the hybrids' window; the model repeats it after the question."""
from __future__ import annotations

import re

from attnprobe.analyses.tasks import pools
from attnprobe.analyses.tasks.prompts import encode, fitted_prompt
from attnprobe.analyses.tasks.registry import Sample, Task, rng_for

WORDS = 16


def build(n, length, seed, tokenizer, window, setting):
    rng, samples = rng_for("string_copy", seed, length), []
    for index in range(n):
        words = pools.draw("word", WORDS, rng)
        prompt, depths = fitted_prompt(
            tokenizer, length, "Remember the list of words hidden in the following text.\n",
            [encode(tokenizer, " WORDS: " + " ".join(words) + ".")],
            "\nRepeat the list of words that follows 'WORDS:' in the text above, exactly.", "WORDS:", rng,
            setting.bos, "noise")
        samples.append(Sample(prompt, (" ".join(words),), {"depth": depths[0], "sample": index}))
    return samples


def score(sample: Sample, response: str) -> bool:
    wanted = sample.answers[0].split()
    return re.findall(r"[a-z]+", response.lower())[:len(wanted)] == wanted


TASKS = (Task("string_copy", "string_copy", "string copy", build=build, score=score,
              scoring=f"correct when the response's first {WORDS} words are the list, in order (exact, case-insensitive)",
              description=f"repeat a list of {WORDS} words from far back in the prompt", max_new_tokens=4 * WORDS),)
