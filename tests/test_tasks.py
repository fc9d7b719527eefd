"""The recall-task registry: every task builds deterministic samples at its length with the answer
inside, scores an oracle right and a wrong answer wrong, draws only from the evaluation pools, stays
inside the model's window; and a new task module alone reaches every reader."""
from __future__ import annotations

import random
import textwrap

import pytest

import attnprobe.analyses.tasks as tasks_package
from attnprobe.analyses import tasks
from attnprobe.analyses.tasks import pools, registry
from attnprobe.errors import AttnprobeError
from attnprobe.probe import texts

from test_retrieval import tiny_model

LENGTHS = {"kv_recall": 16, "copying": 8}  # in the task's own unit; the rest: prompt or haystack tokens
PROMPT_LENGTH = 1024


def _length(name: str) -> int:
    return LENGTHS.get(name, PROMPT_LENGTH)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("name", tasks.names())
def test_task_builds_deterministic_samples_at_its_length_with_the_answer_inside(model, name):
    task = tasks.task(name)
    build = lambda seed: tasks.build(name, 3, _length(name), seed, model.tokenizer, model.info.max_context)  # noqa: E731
    samples = build(0)
    assert len(samples) == 3 and all(s.answers for s in samples)
    assert [s.prompt_ids for s in samples] == [s.prompt_ids for s in build(0)]
    if name != "niah":  # niah's samples are the fixed evaluation needles at fixed depths
        assert [s.answers for s in samples] != [s.answers for s in build(1)]
    for sample in samples:
        prompt = model.tokenizer.decode(sample.prompt_ids)  # one token per character
        assert all(answer in prompt for answer in sample.answers), (name, sample.answers)
        if task.length_unit == "prompt tokens":
            assert 0.9 * PROMPT_LENGTH <= len(sample.prompt_ids) <= PROMPT_LENGTH
        elif task.length_unit in ("filler tokens", "haystack tokens"):
            assert len(sample.prompt_ids) > PROMPT_LENGTH
        depth = sample.metadata.get("depth", 0.0)
        assert 0.0 <= depth <= 1.0


def _rotated(text: str) -> str:
    """A wrong answer of the same shape: every digit and letter moved one on."""
    def move(ch):
        if ch.isdigit():
            return str((int(ch) + 1) % 10)
        if ch.isalpha():
            base = ord("a") if ch.islower() else ord("A")
            return chr(base + (ord(ch) - base + 1) % 26)
        return ch
    return "".join(map(move, text))


@pytest.mark.parametrize("right", [True, False])
@pytest.mark.parametrize("name", [t.name for t in tasks.tasks() if not t.teacher_forced])
def test_generation_scoring_accepts_the_oracle_and_refuses_a_wrong_answer(model, monkeypatch, name, right):
    samples = tasks.build(name, 3, _length(name), 0, model.tokenizer, model.info.max_context)
    answers = {tuple(s.prompt_ids): " ".join(s.answers if right else map(_rotated, s.answers)) for s in samples}
    asked = []

    def oracle(_, prompt, max_new_tokens, **kwargs):
        asked.append(max_new_tokens)
        return model.tokenizer(" " + answers[tuple(prompt)] + ".").input_ids

    monkeypatch.setattr(registry, "greedy_decode", oracle)
    table = tasks.evaluate(model, name, [_length(name)], 3, seed=0, variant="v")
    assert list(table.columns[:6]) == tasks.COLUMNS and (table["task"] == name).all() and (table["variant"] == "v").all()
    assert table["correct"].tolist() == [right] * 3
    assert set(asked) == {tasks.task(name).max_new_tokens}


def test_copying_scores_a_perfect_copier_1_and_a_broken_one_0():
    from attnprobe.hooks.backends.native import NativeBackend
    from attnprobe.hooks.edits import zero_heads
    from planted import COPY_HEAD, planted_model

    model = planted_model()
    table = tasks.evaluate(model, "copying", (6, 10), 3, variant="v")
    assert (table["token_accuracy"] == 1.0).all() and table["correct"].all()
    backend = NativeBackend(model)
    try:
        with backend.patched([zero_heads(COPY_HEAD[0], [COPY_HEAD[1]])]):
            broken = tasks.evaluate(model, "copying", (6, 10), 3)
    finally:
        backend.close()
    assert broken["token_accuracy"].max() < 0.5 and not broken["correct"].any()


@pytest.mark.parametrize("name", tasks.names())
def test_a_length_past_the_window_is_refused_before_any_generation(name):
    small = tiny_model(max_positions=64)
    with pytest.raises(AttnprobeError, match="window|lengths of at least"):
        tasks.build(name, 1, 40 if name == "copying" else 1024 if name != "kv_recall" else 16, 0, small.tokenizer, 64)


# ---- the evaluation pools ----------------------------------------------------------------------

def _items(name: str, sample) -> list[str]:
    if name == "niah":
        return []
    return [item for answer in sample.answers for item in answer.split()]


@pytest.mark.parametrize("name", [n for n in tasks.names() if n != "copying"])
def test_every_key_and_value_comes_from_the_evaluation_side(model, name):
    for sample in tasks.build(name, 4, _length(name), 3, model.tokenizer, model.info.max_context):
        assert all(pools.side(item) == "evaluation" for item in _items(name, sample)), (name, sample.answers)
        if name == "niah":
            assert sample.metadata["sample"] >= registry.DEFAULT_NEEDLES  # none the census ranks with


def test_copying_strings_are_made_of_evaluation_words(tmp_path):
    """With a real BPE vocabulary, the copied word tokens are evaluation-side words only."""
    from transformers import AutoTokenizer
    from tiny_hf import tiny_model_dir

    from attnprobe.analyses.tasks.copying import copy_candidates

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(tmp_path, vocab=600))
    words = [tokenizer.decode([t]) for t in copy_candidates(tokenizer)]
    spaced = [w.strip() for w in words if w.startswith(" ") and len(w.strip()) >= 3]
    assert len(spaced) >= 20 and all(pools.side(w) == "evaluation" for w in spaced)


def test_pools_are_disjoint_from_training_pools_and_ranges():
    rng = random.Random(0)
    assert not set(pools.words("evaluation")) & set(pools.words("training"))
    assert len(pools.words("evaluation")) > 500 and len(pools.words("training")) > 500
    for kind in pools.KINDS:
        training = pools.draw(kind, 50, rng, pool="training")
        assert all(pools.side(item) == "training" for item in training)
        pools.assert_disjoint(training)  # training-side items pass
        evaluation = pools.draw(kind, 1, rng)
        with pytest.raises(AttnprobeError, match="evaluation item"):
            pools.assert_disjoint(training + evaluation)
    with pytest.raises(AttnprobeError, match="evaluation item"):
        pools.assert_disjoint(training_texts=[f"Some text. {pools.evaluation_pools().needles[0]['needle']} More."])
    uuid = pools.draw("uuid", 1, rng)[0]
    with pytest.raises(AttnprobeError, match="evaluation item"):
        pools.assert_disjoint(training_texts=[f'{{"{uuid}": "x"}}'])
    pools.assert_disjoint(training_texts=[texts.prose()[:5000]])  # natural prose holds no evaluation item
    tokenizer = tiny_model().tokenizer
    ranges = {name: texts.token_range(tokenizer, name) for name in texts.RANGES}
    evaluation = ranges[pools.evaluation_pools().haystack_range]
    for name in ("census", "fit"):
        assert ranges[name][1] <= evaluation[0] or ranges[name][0] >= evaluation[1]


def test_needles_the_census_ranked_with_are_never_evaluated():
    assert pools.evaluation_needles(4)[0] == 4
    with pytest.raises(AttnprobeError, match="none is left"):
        pools.evaluation_needles(len(pools.load_needles()))


# ---- the registry -------------------------------------------------------------------------------

TOY = '''
"""A toy task: the last word of the prompt's first line."""
from attnprobe.analyses.tasks import pools
from attnprobe.analyses.tasks.prompts import contains_all, encode
from attnprobe.analyses.tasks.registry import Sample, Task, rng_for


def build(n, length, seed, tokenizer, window, setting):
    rng = rng_for("toy_echo", seed, length)
    words = pools.draw("word", n, rng)
    return [Sample(encode(tokenizer, f"Say {w}.\\n" + "x" * length), (w,), {"sample": i}) for i, w in enumerate(words)]


TASKS = (Task("toy_echo", "toy_echo", "toy echo", build=build, score=lambda s, r: contains_all(r, s.answers),
              scoring="substring", description="say a word"),)
'''


@pytest.fixture
def toy_task(tmp_path, monkeypatch):
    """tasks/toy_echo.py, as a contributor would add it: a new file in the tasks package, nothing else."""
    (tmp_path / "toy_echo.py").write_text(textwrap.dedent(TOY))
    monkeypatch.setattr(tasks_package, "__path__", [*tasks_package.__path__, str(tmp_path)])
    registry.tasks.cache_clear()
    yield
    monkeypatch.undo()
    registry.tasks.cache_clear()


def test_a_new_task_module_alone_reaches_every_reader(toy_task, model, monkeypatch):
    from attnprobe.analyses.experiments import architectures, budget
    from attnprobe.analyses.presentation import figures

    assert "toy_echo" in tasks.names() and "toy_echo" in tasks.help_text()
    monkeypatch.setattr(registry, "greedy_decode", lambda m, prompt, n, **k: m.tokenizer(" " + m.tokenizer.decode(prompt)[4:9]).input_ids)
    sizes = architectures.MatrixSizes.quick(tasks=("toy_echo",), ruler_lengths=(20,), ruler_samples=12)
    table = tasks.run_sized(model, sizes.tasks, sizes, "v")
    assert len(table) == 12 and set(table["task"]) == {"toy_echo"}
    columns = architectures._accuracy_columns(table, sizes.tasks)
    assert columns["toy_echo_n"] == 12 and 0 <= columns["toy_echo_acc"] <= 1
    assert budget.BudgetSizes.quick(tasks=("toy_echo",)).tasks == ("toy_echo",)  # the sweep takes it as a task
    assert "toy_echo_acc" in figures.matrix_columns()


def test_unknown_task_names_list_the_registry_and_the_options_name_every_task():
    import dataclasses

    from attnprobe.analyses.experiments.architectures import MatrixSizes
    from attnprobe.analyses.experiments.budget import BudgetSizes

    with pytest.raises(AttnprobeError, match="choose from .*passkey"):
        tasks.task("nonsense")
    with pytest.raises(AttnprobeError, match="unknown recall task 'nonsense'"):
        MatrixSizes(tasks=("passkey", "nonsense"))
    for sizes in (MatrixSizes, BudgetSizes):
        help_text = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(sizes)}["tasks"]
        assert all(name in help_text for name in tasks.names())


def test_the_light_task_names_are_the_registry():
    """The CLI's help and the configs' checks read task names without importing torch (experiments/config.py):
    they must be the registry's, or a new task module fails here naming the list to extend."""
    from attnprobe.analyses.experiments.config import DEFAULT_TASKS, TASK_NAMES

    assert set(TASK_NAMES) == set(tasks.names()), "add the new task's name to experiments/config.TASK_NAMES"
    assert DEFAULT_TASKS == tasks.DEFAULT
