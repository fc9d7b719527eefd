"""Needle in a haystack with the retrieval probe's samples (`probe.retrieval.build_sample`, the
census's own builder, template and BOS rule), on what never ranked heads: the packaged needles the
census left out (`pools.evaluation_needles`) in haystacks from the evaluation text range."""
from __future__ import annotations

from attnprobe.errors import AttnprobeError
from attnprobe.analyses.tasks.pools import evaluation_needles
from attnprobe.analyses.tasks.registry import Sample, Task
from attnprobe.probe import texts
from attnprobe.probe.retrieval import MAX_NEW_TOKENS, accepted, build_sample, load_needles

DEPTHS = (0.0, 0.5, 1.0)


def build(n, length, seed, tokenizer, window, setting):
    """Sample i: depth depths[i % len(depths)] and the (i // len(depths))-th evaluation needle."""
    depths, packaged = setting.depths or DEPTHS, load_needles()
    indices = evaluation_needles(setting.ranking_needles)
    if -(-n // len(depths)) > len(indices):
        raise AttnprobeError(f"niah has {len(indices)} evaluation needles: ask for at most {len(indices)} per depth")
    hay = texts.haystack_ids(tokenizer, length, path=setting.haystack, purpose="evaluation")
    samples = []
    for i in range(n):
        index, depth = indices[i // len(depths)], depths[i % len(depths)]
        built = build_sample(tokenizer, hay, packaged[index], depth, "auto", setting.bos)
        samples.append(Sample(built["prompt_ids"], (packaged[index]["answer"],), {"depth": depth, "sample": index}))
    return samples


def score(sample: Sample, response: str) -> bool:
    return accepted(response, sample.answers[0])


TASKS = (Task("niah", "niah", "NIAH", build=build, score=score,
              scoring="correct when ROUGE-1 recall of the answer in the response exceeds 0.5 (the retrieval census's rule)",
              description="a packaged needle sentence in evaluation prose",
              sizes=("niah_lengths", "niah_needles", "niah_depths"), length_unit="haystack tokens",
              max_new_tokens=MAX_NEW_TOKENS, grid=True, stop_at_newline=True),)
