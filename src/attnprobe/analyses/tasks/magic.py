"""RULER's needle-in-a-haystack family (Hsieh et al. 2024, arXiv 2404.06654): needles 'One of the
special magic numbers for KEY is: VALUE.' in a haystack, then a question for the values of one or
more keys, answered after 'The special magic numbers for KEY mentioned in the provided text are'.
The single, multi-key, multi-value and multi-query task modules are this builder with their counts.

Keys are evaluation-side words; values evaluation-side 7-digit numbers, words or UUIDs
(`pools.draw`). Every needle lies at a depth beyond the hybrids' window (`prompts.far_depth`)."""
from __future__ import annotations

from attnprobe.analyses.tasks import pools
from attnprobe.analyses.tasks.prompts import contains_all, encode, fitted_prompt
from attnprobe.analyses.tasks.registry import Sample, Setting, rng_for

NOUNS = {"number": "numbers", "word": "words", "uuid": "uuids"}
SCORING = "correct when every value asked for appears in the response (case-insensitive substring, RULER's string match)"


def build(name: str, n: int, length: int, seed: int, tokenizer, setting: Setting, value: str, keys: int = 1,
          values: int = 1, queries: int = 1, haystack: str = "essay") -> list[Sample]:
    """`n` prompts of `length` tokens with `keys` keys of `values` values each; the first `queries` keys are asked."""
    noun, rng, samples = NOUNS[value], rng_for(name, seed, length), []
    for index in range(n):
        drawn = pools.draw("word", keys + (keys * values if value == "word" else 0), rng)
        key_words = drawn[:keys]
        found = drawn[keys:] if value == "word" else pools.draw(value, keys * values, rng)
        by_key = [found[k * values:(k + 1) * values] for k in range(keys)]
        needles = [encode(tokenizer, f" One of the special magic {noun} for {key} is: {item}.")
                   for key, items in zip(key_words, by_key) for item in items]
        asked = ", ".join(key_words[:queries])
        prompt, depths = fitted_prompt(
            tokenizer, length,
            f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {noun} afterwards.\n",
            needles, f"\nWhat are all the special magic {noun} for {asked} mentioned in the provided text?",
            f"The special magic {noun} for {asked} mentioned in the provided text are", rng, setting.bos, haystack,
            setting.haystack)
        answers = tuple(item for items in by_key[:queries] for item in items)
        samples.append(Sample(prompt, answers, {"depth": depths[0], "sample": index}))
    return samples


def score(sample: Sample, response: str) -> bool:
    return contains_all(response, sample.answers)
