"""Offline texts, NIAH sample building, copy-paste scoring and the retrieval census (tiny random Llama;
one SmolLM2 integration test)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model, describe
from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.probe import retrieval, texts


class CharTokenizer:
    """One id per ASCII character (3-127); 1 = BOS, 2 = EOS. Plain text gets no BOS, like SmolLM2."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, None
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) if 3 <= ord(c) < 128 else ord("?") for c in text]
        return type("Encoding", (), {"input_ids": ids})()

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i)) for i in ids if int(i) >= 3)

    def __len__(self):
        return 128


class ChatCharTokenizer(CharTokenizer):
    chat_template = "user/assistant"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "[user]" + messages[0]["content"] + "[end]\n[assistant]"


def tiny_model(tokenizer=None, max_positions=4096) -> Model:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2)
    hf = LlamaForCausalLM(config).eval()
    tokenizer = tokenizer or CharTokenizer()
    return Model(hf, tokenizer, describe(hf, tokenizer, "tiny", "none", "test"))


NEEDLE = {"needle": "The secret ingredient in Mara's soup is smoked paprika.",
          "question": "What is the secret ingredient in Mara's soup?", "answer": "smoked paprika"}


# ---- texts -----------------------------------------------------------------------------------

def test_prose_is_deterministic_clean_english():
    text = texts.prose()
    assert text == texts.prose() and len(text) > 50_000
    lines = text.split("\n")
    assert not any(line.startswith((" ", ">>>")) for line in lines)
    assert all(texts.SENTENCE_END.search(line) for line in lines)


def test_missing_or_empty_text_file_is_a_user_error(tmp_path):
    with pytest.raises(AttnprobeError, match="not found"):
        texts.prose(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(AttnprobeError, match="empty"):
        texts.haystack_ids(CharTokenizer(), 10, path=empty)


def test_user_text_too_short_is_a_user_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(AttnprobeError, match="tokens"):
        texts.haystack_ids(CharTokenizer(), 1000, path=short)


def test_long_user_text_grows_every_range_alike(tmp_path):
    """A user's file four times the layout's need gives haystacks four times the census range."""
    tok = CharTokenizer()
    fixed = sum(size for _, size, _ in texts.LAYOUT if size is not None)
    sentence = "The quick brown fox jumps over the lazy dog near the river bank. "
    long = tmp_path / "long.txt"
    long.write_text(sentence * (5 * fixed // len(sentence) + 1))
    spans = [texts.token_range(tok, name, path=long) for name in texts.RANGES]
    census, evaluation = (end - start for start, end in spans[:2])
    assert census >= 3.9 * texts.LAYOUT[0][1] and evaluation >= 3.9 * texts.LAYOUT[1][1]
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert len(texts.haystack_ids(tok, 3 * texts.LAYOUT[0][1], path=long)) == 3 * texts.LAYOUT[0][1]
    assert texts.token_range(tok, "census") == (0, texts.LAYOUT[0][1])  # the embedded prose keeps its sizes


def test_haystack_held_out_and_natural_sequences():
    tok = CharTokenizer()
    hay = texts.haystack_ids(tok, 3000)
    assert len(hay) == 3000 and hay == texts.haystack_ids(tok, 3000)
    assert texts.haystack_ids(tok, 100, offset=50) == hay[50:150]
    seqs = texts.natural_sequences(tok, 20, 64, seed=3)
    assert seqs.shape == (20, 64) and seqs.dtype == torch.long
    assert len({tuple(row) for row in seqs.tolist()}) == 20
    assert torch.equal(seqs, texts.natural_sequences(tok, 20, 64, seed=3))
    assert not torch.equal(seqs, texts.natural_sequences(tok, 20, 64, seed=4))


def test_text_ranges_are_disjoint_and_recorded():
    """Fit, perplexity, ranking and evaluation text are disjoint token spans of one source; a run records what it used."""
    tok = CharTokenizer()
    spans = [texts.token_range(tok, name) for name in texts.RANGES]
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    with texts.recording() as used:
        parts = {"ranking": texts.haystack_ids(tok, 8000), "evaluation": texts.haystack_ids(tok, 8000, purpose="evaluation"),
                 "perplexity": texts.held_out_ids(tok, 4000), "fit": texts.fit_ids(tok, 8000),
                 "sinks": texts.natural_sequences(tok, 100, 64).flatten().tolist()}
    source = texts.source_ids(tok)
    spans = {}
    for record in used:
        assert source[record["token_start"]:record["token_end"]] in parts.values() or record["purpose"] == "natural sequences"
        spans.setdefault(record["range"], []).append((record["token_start"], record["token_end"]))
    assert set(spans) == {"census", "evaluation", "perplexity", "fit"}
    for a in spans:
        for b in spans:
            if a != b:
                assert all(e1 <= s2 or e2 <= s1 for s1, e1 in spans[a] for s2, e2 in spans[b]), (a, b)
    summary = {r["purpose"]: r for r in texts.summarise(used)}
    assert summary["fit"]["range"] == "fit" and summary["perplexity"]["token_end"] - summary["perplexity"]["token_start"] == 4000
    assert summary["NIAH haystack (evaluation)"]["token_start"] == texts.token_range(tok, "evaluation")[0]
    assert "pydoc_data" in summary["fit"]["source"]
    with pytest.raises(AttnprobeError, match="'perplexity' text range"):
        texts.held_out_ids(tok, 10_000)


def test_sentence_boundaries_skip_dots_inside_words_and_numbers():
    tok = CharTokenizer()
    text = "Use str.join here. Pi is 3.14 today!\nNext one? Yes"
    ends = texts.sentence_boundaries(tok, tok(text).input_ids)
    assert [text[i] for i in ends] == [".", "!", "\n", "?"]
    assert ends[0] == text.index("here.") + 4


# ---- sample building -------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_needle_sits_at_a_sentence_boundary_with_exact_spans(depth):
    tok = CharTokenizer()
    hay = texts.haystack_ids(tok, 400)
    sample = retrieval.build_sample(tok, hay, NEEDLE, depth)
    prompt = sample["prompt_ids"]
    start, end = sample["needle_span"]
    insert = start  # plain format without BOS: the body starts at 0
    assert insert <= round(depth * len(hay))
    assert insert == 0 or insert - 1 in texts.sentence_boundaries(tok, hay)
    assert prompt[:insert] == hay[:insert]
    assert tok.decode(prompt[start:end]).strip() == NEEDLE["needle"]
    assert prompt[end:end + len(hay) - insert] == hay[insert:]
    a0, a1 = sample["answer_span"]
    assert start <= a0 < a1 <= end
    assert tok.decode(prompt[a0:a1]).strip() == "smoked paprika"
    assert tok.decode(prompt).endswith("Answer:")
    assert not sample["bos"]


def test_chat_format_and_bos_option():
    tok = ChatCharTokenizer()
    hay = texts.haystack_ids(tok, 200)
    sample = retrieval.build_sample(tok, hay, NEEDLE, 0.5, bos=True)
    prompt = sample["prompt_ids"]
    assert prompt[0] == tok.bos_token_id and sample["bos"] and sample["format"] == "chat"
    assert tok.decode(prompt[1:7]) == "[user]"
    assert tok.decode(prompt).endswith("[end]\n[assistant]")
    a0, a1 = sample["answer_span"]
    assert tok.decode(prompt[a0:a1]).strip() == "smoked paprika"
    plain = retrieval.build_sample(tok, hay, NEEDLE, 0.5, prompt_format="plain", bos=False)
    assert plain["prompt_ids"][0] != tok.bos_token_id and plain["format"] == "plain"
    with pytest.raises(AttnprobeError, match="chat template"):
        retrieval.build_sample(CharTokenizer(), hay, NEEDLE, 0.5, prompt_format="chat")


class BosTemplateTokenizer(ChatCharTokenizer):
    """A chat template that opens with the BOS token, as SmolLM2's <|im_start|> (its BOS id) does."""

    def __call__(self, text, add_special_tokens=True):
        ids = super().__call__(text.replace("<s>", "\x00"), add_special_tokens).input_ids
        return type("Encoding", (), {"input_ids": [self.bos_token_id if i == ord("?") else i for i in ids]})()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<s>[user]" + messages[0]["content"] + "[end]\n<s>[assistant]"


def test_bos_off_keeps_the_chat_templates_own_first_token():
    tok = BosTemplateTokenizer()
    hay = texts.haystack_ids(tok, 200)
    off = retrieval.build_sample(tok, hay, NEEDLE, 0.5, bos=False)
    default = retrieval.build_sample(tok, hay, NEEDLE, 0.5)
    on = retrieval.build_sample(tok, hay, NEEDLE, 0.5, bos=True)
    assert off["prompt_ids"][0] == tok.bos_token_id  # the template's <s>, not an added BOS
    assert off["prompt_ids"] == default["prompt_ids"] == on["prompt_ids"]  # BOS on adds none: one is there
    a0, a1 = off["answer_span"]
    assert tok.decode(off["prompt_ids"][a0:a1]).strip() == "smoked paprika"


def test_reply_starts_the_answer_after_the_generation_prompt_or_on_a_new_line():
    body = [ord(c) for c in "list"]
    chat, offset = retrieval.wrap_prompt(ChatCharTokenizer(), body, " ask", "auto", reply="key:")
    plain, _ = retrieval.wrap_prompt(CharTokenizer(), body, " ask", "auto", reply="key:")
    assert CharTokenizer().decode(chat) == "[user]list ask[end]\n[assistant]key:" and offset == len("[user]")
    assert CharTokenizer().decode(plain) == "list ask\nkey:"
    assert retrieval.wrap_prompt(CharTokenizer(), body, " ask")[0] == body + [ord(c) for c in " ask"]


def test_packaged_needles_are_well_formed():
    needles = retrieval.load_needles()
    assert len(needles) >= 8
    assert len({n["answer"].lower() for n in needles}) == len(needles)
    assert all(n["answer"] in n["needle"] for n in needles)


# ---- scoring ---------------------------------------------------------------------------------

def test_rouge_acceptance():
    assert retrieval.rouge1_recall("It is Smoked paprika!", "smoked paprika") == 1.0
    assert retrieval.rouge1_recall("smoked salmon", "smoked paprika") == 0.5
    assert not retrieval.accepted("smoked salmon", "smoked paprika")  # the rule is recall > 0.5
    assert retrieval.accepted("a copy of Moby Dick", "a hollow copy of Moby Dick")
    assert retrieval.rouge1_recall("", "Kimble") == 0.0


def test_copy_paste_scores_on_hand_made_argmax():
    prompt = [10, 11, 12, 13, 14, 15]
    span = [2, 5]  # answer tokens 12, 13, 14
    generated = [12, 13, 14, 2]
    argmax = torch.tensor([  # (steps, layers=2, heads=2)
        [[2, 2], [3, 1]],
        [[3, 2], [4, 3]],
        [[4, 2], [5, 4]],
        [[0, 2], [5, 0]],
    ])
    counts = retrieval.copy_counts(argmax, generated, prompt, span)
    assert counts.tolist() == [[3, 1], [0, 2]]
    repeated = retrieval.copy_counts(torch.tensor([[[2]], [[2]]]), [12, 12], prompt, span)
    assert repeated.tolist() == [[2]]  # copying one answer token twice counts twice

    accepted = {"answer_span": span, "copy_counts": counts.tolist(), "accepted": True}
    other = {"answer_span": span, "copy_counts": [[0, 3], [0, 0]], "accepted": True}
    rejected = {"answer_span": span, "copy_counts": [[3, 3], [3, 3]], "accepted": False}
    table = retrieval.heads_table([accepted, other, rejected], 2, 2, n_kv_heads=1)
    score = table.set_index(["layer", "head"])["retrieval_score"]
    active = table.set_index(["layer", "head"])["retrieval_activation"]
    assert np.allclose([score[0, 0], score[0, 1], score[1, 0], score[1, 1]], [0.5, 4 / 6, 0.0, 1 / 3])
    assert np.allclose([active[0, 0], active[0, 1], active[1, 0], active[1, 1]], [0.5, 1.0, 0.0, 0.5])
    assert (table["kv_head"] == 0).all()

    as_json = retrieval.retrieval_heads_json([accepted, other, rejected])
    assert list(as_json) == ["0-0", "0-1", "1-0", "1-1"]
    assert np.allclose(as_json["0-1"], [1 / 3, 1.0])
    assert retrieval.retrieval_heads_json(np.ones((3, 2, 2)))["1-1"] == [1.0, 1.0, 1.0]
    assert retrieval.retrieval_heads_json([rejected], 2, 2)["0-0"] == []


def test_no_accepted_sample_leaves_scores_undefined():
    rejected = {"answer_span": [0, 1], "copy_counts": [[1]], "accepted": False}
    assert retrieval.heads_table([rejected], 1, 1)["retrieval_score"].isna().all()


# ---- decoding and the census -----------------------------------------------------------------

def test_shared_prefix_cache_gives_the_same_greedy_tokens():
    model = tiny_model()
    hay = texts.haystack_ids(model.tokenizer, 300)
    sample = retrieval.build_sample(model.tokenizer, hay, NEEDLE, 0.6)
    plain = retrieval.greedy_decode(model, sample["prompt_ids"], max_new_tokens=6, stop_at_newline=False)
    prefix = retrieval.SharedPrefix(model)
    prefix.upto(sample["prompt_ids"], 100)  # grow, then reuse the same start
    past = prefix.upto(sample["prompt_ids"], sample["needle_span"][0])
    assert past[1] == max(100, sample["needle_span"][0])  # the running cache already covers more: reuse it
    shared = retrieval.greedy_decode(model, sample["prompt_ids"], max_new_tokens=6, stop_at_newline=False, past=past)
    assert shared == plain and len(plain) == 6


def test_prefill_plan_shares_text_across_the_grid():
    tok = CharTokenizer()
    hay = texts.haystack_ids(tok, 240)
    todo = [{"needle_index": 0, "length": length, **retrieval.build_sample(tok, hay[:length], NEEDLE, depth)}
            for length in (240, 120) for depth in (0.0, 1.0)]
    plan = retrieval._shared_plan(todo)
    assert [(s["length"], s["needle_span"][0] > 0) for s, _ in plan] == [(120, False), (240, False), (120, True), (240, True)]
    first, shared = plan[0]
    assert shared > first["needle_span"][1]  # at depth 0 the longer prompt starts with the shorter one's needle and haystack
    assert all(shared >= s["needle_span"][0] and shared < len(s["prompt_ids"]) for s, shared in plan)


def test_census_records_samples_and_resumes():
    model = tiny_model()
    backend = NativeBackend(model)
    seen = []
    heads, samples = retrieval.retrieval_census(model, backend, lengths=[120], depths=[0.0, 0.5], needles=1,
                                                on_sample=seen.append, max_new_tokens=3)
    assert [s["key"] for s in samples] == ["len120-depth000-needle0", "len120-depth050-needle0"]
    assert len(seen) == 2 and len(heads) == 2 * 4
    for sample in samples:
        assert np.asarray(sample["copy_counts"]).shape == (2, 4)
        assert 1 <= len(sample["generated_ids"]) <= 3
        a0, a1 = sample["answer_span"]
        assert model.tokenizer.decode(sample["prompt_ids"][a0:a1]).strip() == "smoked paprika"
    again = []
    done = {samples[0]["key"]: copy.deepcopy(samples[0])}
    _, resumed = retrieval.retrieval_census(model, backend, lengths=[120], depths=[0.0, 0.5], needles=1,
                                            on_sample=again.append, done=done, max_new_tokens=3)
    assert [s["key"] for s in again] == [samples[1]["key"]]
    assert resumed == samples  # deterministic, and the finished sample is reused as given


def test_prompt_longer_than_the_window_is_a_user_error():
    model = tiny_model(max_positions=64)
    with pytest.raises(AttnprobeError, match="window"):
        retrieval.greedy_decode(model, list(range(3, 63)), max_new_tokens=10)


# ---- SmolLM2 ---------------------------------------------------------------------------------

@pytest.mark.real_model
def test_smollm2_passkey_and_tiny_census():
    from attnprobe.analyses.tasks import Setting, evaluate
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import load_model

    model = load_model("smollm2-135m")
    table = evaluate(model, "passkey", [512], 1, setting=Setting(depths=(0.5,)))
    assert table["correct"].all(), table.to_dict("records")
    heads, samples = retrieval.retrieval_census(model, make_backend("native", model), lengths=[512],
                                                depths=[0.25, 0.75], needles=1)
    assert any(s["accepted"] for s in samples), [s["generated_text"] for s in samples]
    assert (heads["retrieval_score"] >= 0).all() and (heads["retrieval_score"] > 0).any()
