"""Synthetic retrieval training documents: exact lengths, answers present where they are asked for, pools
disjoint from every evaluation pool (today's recall.py and analyses/tasks if present), the mix into the
conversion's stages, and bad input."""
from __future__ import annotations

import random
import re
import sys

import pytest
import torch

from attnprobe.analyses.conversion import pools, retrieval_data as rd
from attnprobe.analyses.conversion.data import TrainingData, _bos, training_data, training_prose_ids
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import load_model
from attnprobe.probe import texts
from tiny_hf import tiny_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATTNPROBE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_model(str(tiny_model_dir(tmp_path_factory.mktemp("model"))), device="cpu")


@pytest.mark.parametrize("kind", rd.KINDS)
@pytest.mark.parametrize("length", [512, 2048])
def test_documents_are_exactly_their_length_with_answers_asked_and_given(model, kind, length):
    make = rd.builder(model)
    rng = random.Random(length)
    for _ in range(3):
        doc = make.document(kind, length, rng)
        assert len(doc.ids) == length and doc.ids[:len(make.bos)] == make.bos == _bos(model)  # as data.py's windows
        assert len(doc.answers) == (rd.QUERIES if kind in ("kv", "multi_query") else 1)
        for (start, stop), answer in zip(doc.answers, doc.answer_texts):
            assert model.tokenizer.decode(doc.ids[start:stop]).strip() == answer.strip()
            assert answer.strip() in model.tokenizer.decode(doc.ids[:start])  # what is asked for lies earlier


def test_kv_answers_are_the_values_of_their_keys(model):
    doc = rd.builder(model).kv(1024, random.Random(3))
    text = model.tokenizer.decode(doc.ids)
    for question in re.finditer(r"Which code has the key (\w+)\?\n\1: (\d+)", text):
        key, value = question.groups()
        assert f"{key}: {value}\n" in text[:question.start()]
    assert len(re.findall(r"Which code has the key", text)) == rd.QUERIES


def test_pools_are_disjoint_from_every_evaluation_pool(model):
    evaluation = pools.evaluation_pools()
    training = pools.training_pools(evaluation=evaluation)
    pools.check_pools(training, evaluation)
    assert len(training["words"]) > 100_000
    assert not any(evaluation["is_item"](w) or w in evaluation["words"] for w in training["words"])
    assert training["text_ranges"] == {"fit"} and not training["text_ranges"] & evaluation["text_ranges"]
    make, rng = rd.builder(model), random.Random(0)
    numbers = [make.number(rng) for _ in range(2000)]
    assert not any(evaluation["is_item"](n) for n in numbers) and len(set(numbers)) > 1900
    pools.assert_training_items(numbers)
    if evaluation["source"] == "analyses/recall.py":  # its numbers are 4- and 5-digit: none is 6-digit
        assert min(pools.TRAINING_NUMBERS) >= 100_000


def test_the_evaluation_rule_holds_what_the_evaluation_draws(model):
    """evaluation_pools' `is_item` holds every key and value the evaluation draws (recall.py's answers, or the
    tasks pools' evaluation side), and none of what training draws."""
    evaluation = pools.evaluation_pools()
    if evaluation["source"] == "analyses/recall.py":
        from attnprobe.analyses import recall

        drawn = list(recall.passkey(model, lengths=(128,), depths=(0.5,), samples=4)["answer"])
        drawn += list(recall.kv_recall(model, n_pairs=(16,), samples=4, beyond=8)["answer"])
        drawn += list(recall._vocabulary())
    else:
        from attnprobe.analyses.tasks import pools as declared

        rng = random.Random(0)
        drawn = [item for kind in ("word", "number", "uuid") for item in declared.draw(kind, 50, rng, "evaluation")]
        trained = [item for kind in ("word", "number") for item in declared.draw(kind, 50, rng, "training")]
        assert not any(evaluation["is_item"](item) for item in trained)
    assert drawn and all(evaluation["is_item"](item) for item in drawn)
    with pytest.raises(AttnprobeError, match="evaluation item"):
        pools.assert_training_items([str(drawn[0])])


def test_documents_hold_no_evaluation_needle_and_read_only_the_fit_range(model):
    make = rd.builder(model)
    start, end = texts.token_range(model.tokenizer, "fit")
    assert make.haystack == training_prose_ids(model) == texts.source_ids(model.tokenizer)[start:end]
    rng = random.Random(0)
    text = " ".join(model.tokenizer.decode(make.document(kind, 1024, rng).ids) for kind in rd.KINDS for _ in range(2))
    for needle in pools.evaluation_pools()["needles"]:
        assert needle["needle"] not in text and needle["answer"] not in text
    evaluation = pools.evaluation_pools()
    for word in re.findall(r"key (\w+)\?", text):
        assert word not in evaluation["words"] and not evaluation["is_item"](word)


def test_mix_replaces_the_stated_fraction_of_the_chosen_stage(model):
    windows = torch.arange(40 * 512).view(40, 512) % 300 + 3
    data = TrainingData(windows, {"sha256": "x"})
    for stages, changed_span in (("2", range(10, 40)), ("1", range(0, 10)), ("both", range(0, 40))):
        mixed = rd.mix_retrieval(model, data, rd.RetrievalMix(fraction=0.5, stages=stages), 10, 30, seed=1)
        changed = [i for i in range(40) if not torch.equal(mixed.windows[i], windows[i])]
        assert set(changed) <= set(changed_span) and len(changed) == round(0.5 * len(changed_span))
        assert mixed.description["sha256"] != "x" and sum(mixed.description["retrieval"]["documents"].values()) == len(changed)
    assert rd.mix_retrieval(model, data, rd.RetrievalMix(fraction=0.0), 10, 30) is data


def test_bad_input_is_one_line(model, tmp_path):
    for fraction in (-0.1, 1.5):
        with pytest.raises(AttnprobeError, match="not a share"):
            rd.RetrievalMix(fraction=fraction).check(512, 2048)
    with pytest.raises(AttnprobeError, match="exceed the model's window"):
        rd.RetrievalMix(fraction=0.2).check(4096, 2048)
    with pytest.raises(AttnprobeError, match="choose 1, 2 or both"):
        rd.RetrievalMix(fraction=0.2, stages="3").check(512, 2048)
    with pytest.raises(AttnprobeError, match="too few|longer --length"):
        rd.builder(model).kv(24, random.Random(0))
    words = tmp_path / "words.txt"
    words.write_text("\n".join([f"zork{i}" for i in range(80)] + [sorted(pools.evaluation_pools()["words"])[5]]))
    with pytest.raises(AttnprobeError, match="evaluation words"):
        rd.builder(model, str(words))
    leaked = tmp_path / "leaked.txt"
    leaked.write_text(texts.prose()[:5000] + " " + pools.evaluation_pools()["needles"][3]["needle"])
    with pytest.raises(AttnprobeError, match="evaluation needle"):
        training_data(model, 512, 128, [leaked])


def test_cli_refuses_a_fraction_outside_0_1_with_exit_2(model, tmp_path, monkeypatch, capsys):
    from attnprobe.analyses import cli

    monkeypatch.setattr(sys, "argv", ["attnprobe", "convert", "--model", model.info.model_id, "--kernel", "hedgehog",
                                      "--layers", "0", "--retrieval-fraction", "1.5", "--length", "64", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "not a share" in message and len(message.splitlines()) == 1


def test_a_packed_recipe_counts_its_stages_in_data_windows():
    from attnprobe.analyses.conversion.train import ConvertConfig, packed, stage_data_windows, stage_windows

    config = ConvertConfig(length=512, window=128, batch=2, transfer_tokens=2048, tokens=4096)
    assert stage_windows(config) == (4, 8)  # training sequences of 512
    transfer, e2e = stage_data_windows(config)
    assert (transfer, e2e) == (16, 32)
    windows = torch.arange(48 * 128).view(48, 128)
    sequences = packed(windows, config)  # the stage-2 sequences are made of exactly the stage-2 data windows
    assert torch.equal(sequences[4:12].reshape(-1, 128), windows[transfer:transfer + e2e])


@pytest.mark.parametrize("length", [1024, 2048])
def test_every_kind_fills_its_window_exactly_over_many_draws(model, length):
    """The key-value questions, encoded apart from their answers, outgrew the room reserved for them on
    SmolLM2's tokenizer (2,049-2,051 tokens in a 2,048 window): the document drops unasked lines to fit."""
    make = rd.builder(model)
    for kind in rd.KINDS:
        for seed in range(25):
            document = make.document(kind, length, random.Random(seed))
            assert len(document.ids) == length, (kind, seed)
            for (start, stop), answer in zip(document.answers, document.answer_texts):
                assert model.tokenizer.decode(document.ids[start:stop]).strip() == answer.strip()


def test_key_value_documents_fit_when_questions_encode_longer_than_estimated(model, monkeypatch):
    """A tokenizer whose question strings, encoded alone, take more tokens than in the estimate (as SmolLM2's did):
    unasked lines make room, and every asked line is still there."""
    make = rd.builder(model)
    plain = make.encode
    monkeypatch.setattr(make, "encode", lambda text: plain(text) + (plain(" x") * 4 if text.endswith(":") else []))
    for seed in range(10):
        document = make.kv(1024, random.Random(seed))
        assert len(document.ids) == 1024
        text = model.tokenizer.decode(document.ids)
        for answer in document.answer_texts:
            assert text.count(answer) >= 2  # in its line and after its question
