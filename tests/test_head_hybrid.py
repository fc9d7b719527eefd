"""Head-level hybrid conversion on a tiny GQA Llama: budgets in KV heads, the selectors (census scores, the
ablation probe, DuoAttention's gates, KL-guided layers, uniform layers, random), their overlap, one row end to end (selector ->
kept KV heads -> conversion -> evaluated, gated row), and the control it is gated against (same data, budget
and length; a control that moves once the next-token term is on)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from attnprobe.analyses.conversion import head_hybrid as hh
from attnprobe.analyses.conversion import command, rows
from attnprobe.analyses.conversion import train as conversion
from attnprobe.analyses.conversion.data import training_data
from attnprobe.analyses.experiments import selectors
from attnprobe.errors import AttnprobeError
from attnprobe.probe import texts
from test_convert import model_dir, prose_file, tiny  # noqa: F401 (the conversion tests' fixtures, shared)

LENGTH = 32


def census_dir(tmp_path, model, weights=None, scores=None):
    """A census run directory: manifest.json naming the weights and heads.parquet with both retrieval scores."""
    info = model.info
    scores = scores or {}
    table = pd.DataFrame([{"layer": l, "head": h, "retrieval_score": scores.get((l, h), 0.0),
                           "teacher_forced_retrieval_score": scores.get((l, h), 0.0) * 2}
                          for l in range(info.n_layers) for h in range(info.n_heads)])
    tmp_path.mkdir(parents=True, exist_ok=True)
    table.to_parquet(tmp_path / "heads.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps({"weights_sha256": weights or info.weights_sha256}))
    return tmp_path


def test_budgets_are_kv_heads_neither_none_nor_all():
    assert hh.kv_count("2%", 90) == 2 and hh.kv_count("6.25%", 96) == 6 and hh.kv_count("0.125", 96) == 12
    assert hh.kv_count("3", 90) == 3 and hh.kv_count(0.25, 4) == 1
    for budget in ("2%", "0.1", "0", "4", "100%", "1.0"):
        with pytest.raises(AttnprobeError, match="keeps .* of the model's 4 KV heads: choose"):
            hh.kv_count(budget, 4)
    with pytest.raises(AttnprobeError, match="cannot read"):
        hh.kv_count("a quarter", 4)


def test_census_selectors_rank_kv_heads_and_refuse_a_missing_or_foreign_census(tiny, tmp_path):
    model, backend = tiny
    # head (1, 3) scores highest: its KV head (1, 1) is kept first, with both of its query heads
    census = census_dir(tmp_path / "census", model, scores={(1, 3): 0.9, (0, 0): 0.5})
    for selector in ("retrieval", "teacher-forced"):
        chosen = hh.HeadHybrid(selector=selector, kv_budget="2")
        kept = hh.kept_kv_heads(model, backend, chosen, census, tmp_path / f"out-{selector}")
        assert kept == [(1, 1), (0, 0)]
        saved = pd.read_parquet(tmp_path / f"out-{selector}" / "selection" / f"{selector}-0.parquet").sort_values("rank")
        factor = 2 if selector == "teacher-forced" else 1  # census_dir's teacher-forced column is twice the other
        assert list(saved.score[:2]) == [0.9 * factor, 0.5 * factor]  # the record keeps the scores it ranked by
        assert hh.variant(model, chosen, kept).keep(model, None) == {(1, 2), (1, 3), (0, 0), (0, 1)}
    for where, match in ((None, "pass --from RUN"), (tmp_path / "nothing", "no finished census"),
                         (census_dir(tmp_path / "foreign", model, weights="f" * 64), "other weights")):
        with pytest.raises(AttnprobeError, match=match):
            hh.HeadHybrid(selector="retrieval").check(model, where)
    with pytest.raises(AttnprobeError, match="unknown family"):
        hh.HeadHybrid(selector="random", family="hedgehog").check(model, None)
    with pytest.raises(AttnprobeError, match="unknown selector"):
        hh.HeadHybrid(selector="oracle").check(model, None)


def test_the_ablation_probe_scores_a_dead_kv_head_zero(tiny):
    """A KV head whose query heads write nothing (o_proj columns zero) loses nothing when masked; the others do."""
    model, backend = tiny
    attention = model.hf.model.layers[1].self_attn
    saved = attention.o_proj.weight.detach().clone()
    d = model.info.head_dim
    with torch.no_grad():
        attention.o_proj.weight[:, : 2 * d] = 0  # query heads 0 and 1: KV head 0 of layer 1
    try:
        scores = hh.ablation_scores(model, backend, documents=2, length=256)
    finally:
        with torch.no_grad():
            attention.o_proj.weight.copy_(saved)
    by_unit = scores.set_index(["layer", "unit"])["score"]
    assert len(by_unit) == model.info.n_layers * model.info.n_kv_heads
    assert by_unit[(1, 0)] == pytest.approx(0.0, abs=1e-6)
    assert (by_unit.drop((1, 0)).abs() > 1e-5).all()


def test_duo_gates_rank_kv_heads_highest_gate_first(tiny, tmp_path, monkeypatch):
    """The duo selector keeps the KV heads whose trained gates stay most open; its gates train on passkeys of
    `probe_length` tokens from the census's ranking text."""
    model, backend = tiny
    info, asked = model.info, {}
    planted = pd.DataFrame([{"layer": l, "unit": kv, "score": (l * info.n_kv_heads + kv) % 5 / 10}
                            for l in range(info.n_layers) for kv in range(info.n_kv_heads)])

    def gates(model, backend, config):
        asked["lengths"] = config.lengths
        return planted
    monkeypatch.setattr(selectors, "duo_gates", gates)
    hybrid = hh.HeadHybrid(selector="duo", kv_budget="2", probe_length=128)
    kept = hh.kept_kv_heads(model, backend, hybrid, None, tmp_path)
    assert asked["lengths"] == (128,)
    score = planted.set_index(["layer", "unit"])["score"]
    assert len(set(score)) == len(score)  # no ties: the kept set is determined
    assert min(score[unit] for unit in kept) > score.drop(kept).max()


def test_duo_gates_train_on_the_tiny_model(tiny):
    model, backend = tiny
    from attnprobe.analyses.experiments.config import DuoConfig

    gates = selectors.duo_gates(model, backend, DuoConfig(lengths=(128,), passkeys=1, passkey_words=2, steps=3, sinks=4,
                                                          window=16))
    assert len(gates) == model.info.n_layers * model.info.n_kv_heads and gates["score"].between(0, 1).all()
    assert (gates["score"] < 1).any()  # the L1 term and the distillation moved the gates from 1


def test_kl_guided_layers_rank_by_the_kl_a_softmax_layer_gains(tiny, prose_file, tmp_path):
    model, backend = tiny
    config = conversion.ConvertConfig(kernel="gated-deltanet", length=LENGTH, batch=2, transfer_tokens=2 * LENGTH,
                                      tokens=2 * LENGTH, checkpoint_every=10)
    data = training_data(model, 2 * 2 * LENGTH, LENGTH, [prose_file])
    scores = hh.kl_layer_scores(model, backend, "gated-deltanet", config, data, tmp_path)
    kl = {name: json.loads((tmp_path / name / "conversion.json").read_text())["losses"]["first_batch_kl"][-1]
          for name in ("all-converted", "softmax-layer-0", "softmax-layer-1")}
    for layer in (0, 1):
        gained = scores[scores["layer"] == layer]["score"]
        assert len(gained) == model.info.n_kv_heads and (gained == kl["all-converted"] - kl[f"softmax-layer-{layer}"]).all()
    assert kl["all-converted"] > 0 and len(set(kl.values())) == 3  # each exact layer changes the KL
    order = selectors.order_by_score(scores)
    best = 0 if kl["softmax-layer-0"] < kl["softmax-layer-1"] else 1
    assert [layer for layer, _ in order[:2]] == [best, best]


def test_uniform_layers_space_whole_layers_evenly():
    info = SimpleNamespace(n_layers=30, n_kv_heads=3, n_heads=9)
    assert hh.uniform_layers(info, 9) == [(layer, kv) for layer in (5, 15, 25) for kv in range(3)]
    assert hh.uniform_layers(info, 4) == [(7, 0), (7, 1), (7, 2), (22, 0)]
    assert hh.uniform_layers(info, 3) == [(15, 0), (15, 1), (15, 2)]


def test_overlap_of_selectors_per_budget(tiny, tmp_path):
    model, backend = tiny
    census = census_dir(tmp_path / "census", model, scores={(1, 3): 0.9, (0, 0): 0.5})

    def sets(selector, seed, count):
        chosen = hh.HeadHybrid(selector=selector, kv_budget=str(count), draw=seed)
        return hh.kept_kv_heads(model, backend, chosen, census, tmp_path / "out")

    table = hh.overlap_by_budget(model, sets, ["retrieval", "teacher-forced", "uniform-layers", "random"], ["25%", "2"], draws=3)
    assert list(table.columns[:7]) == ["budget", "units", "selector_a", "seed_a", "selector_b", "seed_b", "jaccard"]
    pairs = table[table["budget"] == "2"].set_index(["selector_a", "seed_a", "selector_b", "seed_b"])["jaccard"]
    assert len(pairs) == 6 * 5 // 2  # retrieval, teacher-forced, uniform-layers and 3 random draws
    assert pairs[("retrieval", 0, "teacher-forced", 0)] == 1.0
    # retrieval keeps (1, 1) and (0, 0); uniform layers keep layer 1 whole: (1, 0) and (1, 1)
    assert pairs[("retrieval", 0, "uniform-layers", 0)] == pytest.approx(1 / 3)
    assert set(table["units"]) == {1, 2}


def test_a_head_hybrid_row_end_to_end(tiny, prose_file, tmp_path, monkeypatch):
    """Selector -> kept KV heads -> two-stage conversion of the rest -> evaluated row gated against the control, in two
    parts as on a GPU and a CPU: the evaluate part reads no training data and keeps the row's heads."""
    from attnprobe.analyses.conversion.retrieval_data import RetrievalMix

    model, backend = tiny
    hybrid = hh.HeadHybrid(selector="ablation", kv_budget="25%", family="gated-deltanet", probe_documents=2, probe_length=256)
    length = 128  # room for a retrieval document
    config = conversion.ConvertConfig(tokens=2 * 2 * length, transfer_tokens=2 * 2 * length, length=length, batch=2, lora_rank=4,
                                      ce_weight=0.5, checkpoint_every=10)
    common = dict(config=config, kernel=None, heads=None, layers=None, from_run=None, variants=None, control=True,
                  data=[prose_file], dataset=None, epochs=1, evaluate=True, census=False, quick=True, hybrid=hybrid)
    assert command.run(model, tmp_path, **common, parts="data,convert",
                    retrieval=RetrievalMix(fraction=0.5, kinds=("passkey", "needle"))) is None
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert kinds == ["plan", "data", "converted", "converted"]
    overlap = pd.read_parquet(tmp_path / "selection" / "overlap.parquet")
    assert set(overlap["budget"]) == {"25%"} and len(overlap) == 5 * 4 // 2  # ablation, uniform layers, 3 random draws
    assert overlap["jaccard"].between(0, 1).all()
    data = json.loads(next(l for l in (tmp_path / "results.jsonl").read_text().splitlines() if '"data"' in l))
    assert data["retrieval"]["documents"] == {"passkey": 1, "needle": 1} and data["retrieval"]["stages"] == "2"
    monkeypatch.setattr("attnprobe.analyses.conversion.data.training_data", lambda *a, **k: pytest.fail("evaluating read training data"))
    monkeypatch.setattr(hh, "ablation_scores", lambda *a, **k: pytest.fail("selected again"))
    table = command.run(model, tmp_path, **common, parts="evaluate", retrieval=None)
    ranking = pd.read_parquet(tmp_path / "selection" / "ablation-0.parquet").sort_values("rank")
    kept = (int(ranking.iloc[0]["layer"]), int(ranking.iloc[0]["unit"]))
    manifest = json.loads((tmp_path / "conversions" / hybrid.name / "conversion.json").read_text())
    replaced = {(int(layer), h) for layer, heads in manifest["heads"].items() for h in heads}
    group = model.info.n_heads // model.info.n_kv_heads
    assert {(kept[0], kept[1] * group + g) for g in range(group)}.isdisjoint(replaced)
    assert len(replaced) == model.info.n_layers * model.info.n_heads - group and manifest["kernel"] == "gated-deltanet"
    row = table.set_index("architecture").loc[hybrid.name]
    assert row["softmax_heads"] == group and row["gate"] in ("pass", "FAIL") and row["gate_ratio"] > 0
    assert {"original", "control", hybrid.name} == set(table["architecture"])
    # the retrieval mix refuses a bad fraction before anything trains
    with pytest.raises(AttnprobeError, match="not a share"):
        command.run(model, tmp_path / "bad", conversion.ConvertConfig(tokens=64, transfer_tokens=64, length=LENGTH, batch=2,
                                                                       lora_rank=4, checkpoint_every=10),
                    kernel=None, heads=None, layers=None, from_run=None, variants=None, control=True, data=[prose_file],
                    dataset=None, epochs=1, evaluate=False, census=False, quick=True, hybrid=hybrid, retrieval=RetrievalMix(fraction=2))


def _manifest(folder, tokens=1024, length=32, sha="a"):
    folder.mkdir(parents=True)
    config = {**conversion.ConvertConfig().__dict__, "tokens": tokens, "length": length, "batch": 2}
    (folder / "conversion.json").write_text(json.dumps({"config": config, "data": {"sha256": sha}}))


def test_rows_refuse_a_control_with_other_data_budget_or_length(tmp_path):
    control, row = rows.control_variant(), SimpleNamespace(name="row")
    _manifest(tmp_path / "conversions" / "control")
    for name, changes, match in (("same", {}, None), ("data", {"sha": "b"}, "data"), ("budget", {"tokens": 2048}, "budget"),
                                 ("length", {"length": 64, "tokens": 2048}, "budget and length")):
        _manifest(tmp_path / "conversions" / name, **changes)
        variants = [control, SimpleNamespace(name=name)]
        if match is None:
            rows.same_stage2_as_control(tmp_path, variants)
        else:
            with pytest.raises(AttnprobeError, match=f"another {match}: convert both in one run"):
                rows.same_stage2_as_control(tmp_path, variants)
    rows.same_stage2_as_control(tmp_path, [row])  # no control among the rows: nothing to compare


def test_the_control_moves_only_with_the_next_token_term(tiny, prose_file, tmp_path):
    """The control starts equal to its teacher (LoRA's B is zero), so the KL's gradient is zero up to rounding: without
    the next-token term it stays the original; with it the adapters get a gradient and train. The run's ce_weight
    reaches it."""
    model, backend = tiny
    ids = torch.tensor([texts.fit_ids(model.tokenizer, 2 * LENGTH)]).view(2, LENGTH)
    norms = {}
    for weight in (0.0, 0.5):
        with conversion.adapted(model, "lora", 4) as params, conversion.teacher_view(model, "lora") as teacher:
            loss = conversion.distillation_loss(model.hf(input_ids=ids).logits, teacher(ids), ids, weight)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            norm = sum(float(g.abs().sum()) for g in grads if g is not None)
        norms[weight] = norm
    assert norms[0.0] < 1e-6 * norms[0.5]  # the KL's gradient at the teacher is zero up to rounding
    config = conversion.ConvertConfig(kernel=None, length=LENGTH, batch=2, transfer_tokens=2 * 2 * LENGTH, tokens=2 * 2 * LENGTH)
    data = training_data(model, 4 * 2 * LENGTH, LENGTH, [prose_file])
    for weight in (0.0, 0.5):
        import dataclasses

        out = tmp_path / f"ce{weight}"
        rows.conversion_matrix(model, backend, [rows.control_variant()], dataclasses.replace(config, ce_weight=weight), data,
                               out, sizes=None, evaluate=False)
        manifest = json.loads((out / "conversions" / "control" / "conversion.json").read_text())
        assert manifest["config"]["ce_weight"] == weight
        from safetensors.torch import load_file

        lora_b = [v for k, v in load_file(out / "conversions" / "control" / "adapters.safetensors").items() if "lora_B" in k]
        kl_before, kl_after = manifest["losses"]["first_batch_kl"]
        if weight == 0:  # only rounding noise reaches the adapters: the control stays the original
            assert kl_before == 0 and kl_after < 1e-3
        else:
            assert max(float(v.abs().max()) for v in lora_b) > 1e-3 and kl_after < kl_before


@pytest.mark.parametrize("options,message", [(["--selector", "random", "--kv-budget", "100%"], "keeps 4 of the model's 4 KV heads"),
                                             (["--selector", "random", "--kv-budget", "1%"], "keeps 0 of"),
                                             (["--selector", "teacher-forced"], "pass --from RUN")])
def test_cli_bad_hybrid_input_is_one_line_and_exit_2(tiny, tmp_path, monkeypatch, capsys, options, message):
    import sys

    from attnprobe.analyses import cli

    model, _ = tiny
    monkeypatch.setattr(sys, "argv", ["attnprobe", "convert", "--model", model.info.model_id, *options, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message in error and len(error.splitlines()) == 1
