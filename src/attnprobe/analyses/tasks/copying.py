"""Copy a random token string: 'Repeat: <string>\\n<first token>' must continue with the rest of the string.

Scored teacher-forced in one pass: `token_accuracy` is the share of next-token argmaxes over the
copy that are right (the matrix reports it per string, its interval a bootstrap over strings);
`correct` says the argmax continuation is the string (greedy copying would be exact). Tokens are
evaluation-side words (`pools.side`; single letters of a tiny vocabulary are no pool item), distinct
within a string while the candidates last, and never tokens of the instruction, so each copied token
has one earlier occurrence to copy from."""
from __future__ import annotations

from attnprobe.errors import AttnprobeError
from attnprobe.analyses.tasks import pools
from attnprobe.analyses.tasks.prompts import encode
from attnprobe.analyses.tasks.registry import Sample, Task, rng_for
from attnprobe.probe.retrieval import wrap_prompt


def copy_candidates(tokenizer, wanted: int = 1000) -> list[int]:
    """Token ids that decode to one alphabetic word (an evaluation-side one, `pools.side`) and encode
    back to themselves.

    Scans ids in order and stops at `wanted` word tokens with a leading space (single letters or
    bare words are used only when a small vocabulary has too few)."""
    vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    spaced, bare = [], []
    for token in range(vocab_size):
        text = tokenizer.decode([token])
        word = text.strip()
        if not word.isascii() or not word.isalpha() or encode(tokenizer, text) != [token]:
            continue
        if not (text.startswith(" ") and len(word) >= 3):
            bare.append(token)
        elif pools.side(word) == "evaluation":
            spaced.append(token)
        if len(spaced) >= wanted:
            return spaced
    return spaced if len(spaced) >= 100 else spaced + bare


def build(n, length, seed, tokenizer, window, setting):
    rng, samples = rng_for("copying", seed, length), []
    head, newline = encode(tokenizer, "Repeat: "), encode(tokenizer, "\n")
    candidates = [t for t in copy_candidates(tokenizer) if t not in head + newline]
    if len(candidates) < 2:
        raise AttnprobeError("the tokenizer has too few word tokens for the copying task")
    for index in range(n):
        string = rng.sample(candidates, length) if length <= len(candidates) else [rng.choice(candidates) for _ in range(length)]
        prompt, _ = wrap_prompt(tokenizer, head + string + newline + string[:1], "", "plain", setting.bos)
        samples.append(Sample(prompt, (tokenizer.decode(string[1:]),), {"sample": index}, answer_ids=tuple(string[1:])))
    return samples


def score(sample: Sample, response: str) -> bool:
    return response == sample.answers[0]


TASKS = (Task("copying", "copy", "copy", build=build, score=score,
              scoring="teacher-forced: correct when the argmax continuation decodes to the string (exact); "
                      "token_accuracy is the share of its tokens right",
              description="repeat a random string of word tokens", sizes=("copy_lengths", "copy_samples", None),
              length_unit="string tokens", max_new_tokens=0, teacher_forced=True),)
