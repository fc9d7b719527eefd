"""RULER's variable tracking: a chain of assignments 'VAR A = 12345.', 'VAR B = VAR A.', ... hidden in
order in the noise haystack; the question asks for every variable that holds the value."""
from __future__ import annotations

from attnprobe.analyses.tasks import pools
from attnprobe.analyses.tasks.prompts import contains_all, encode, fitted_prompt
from attnprobe.analyses.tasks.registry import Sample, Task, rng_for

HOPS = 4  # assignments after the first: five variables in all


def build(n, length, seed, tokenizer, window, setting):
    rng, samples = rng_for("variable_tracking", seed, length), []
    for index in range(n):
        names = pools.draw("name", HOPS + 1, rng)
        value = pools.draw("number", 1, rng, digits=5)[0]
        lines = [f" VAR {names[0]} = {value}."] + [f" VAR {new} = VAR {old}." for old, new in zip(names, names[1:])]
        prompt, depths = fitted_prompt(
            tokenizer, length, "Memorize and track the chain of variable assignments hidden in the following text.\n",
            [encode(tokenizer, line) for line in lines],
            f"\nQuestion: Find all variables that are assigned the value {value} in the text above.",
            f"Answer: According to the chain of variable assignments in the text above, {HOPS + 1} variables are "
            f"assigned the value {value}, they are:", rng, setting.bos, "noise", ordered=True)
        samples.append(Sample(prompt, tuple(names), {"depth": depths[0], "sample": index}))
    return samples


def score(sample: Sample, response: str) -> bool:
    return contains_all(response, sample.answers)


TASKS = (Task("variable_tracking", "variable_tracking", "variable tracking", build=build, score=score,
              scoring="correct when every variable of the chain appears in the response (case-insensitive substring)",
              description=f"a chain of {HOPS} assignments, all variables asked for", max_new_tokens=48),)
