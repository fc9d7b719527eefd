"""Massive activations: every dim is found where it first appears and where it settles (its onset), and the
intervention covers each one at its onset."""
import pandas as pd
import pytest
import torch

from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.hooks.reducers import Keep
from attnprobe.hooks.sites import Site
from attnprobe.probe.census import Census, CensusConfig
from attnprobe.probe.massive import MEAN_MEANING, first_layers, massive_edits, massive_positions

from planted import BOS, MASSIVE_DIM, SINK_HEAD, planted_model

LATE_DIM = 126  # written by the sink head in layer 1 from BOS's massive value: massive from layer 1 on


def model_with_a_late_dim():
    model = planted_model()
    attn = model.hf.model.layers[SINK_HEAD[0]].self_attn
    head_dim = model.info.head_dim
    with torch.no_grad():
        attn.v_proj.weight.view(2, head_dim, -1)[SINK_HEAD[1] // 2, 0, MASSIVE_DIM] = 1.0
        attn.o_proj.weight[LATE_DIM, SINK_HEAD[1] * head_dim] = 50.0  # ~11 (BOS's normed value) x 50 on every token
    return model


def test_each_dim_is_overwritten_at_its_own_onset_layer(tmp_path):
    model = model_with_a_late_dim()
    backend = NativeBackend(model)
    config = CensusConfig(massive_sequences=6, massive_length=48, perplexity_tokens=128, perplexity_length=64)
    Census(model, backend, config, tmp_path).execute(("massive", "massive_intervention"))
    dims = pd.read_parquet(tmp_path / "massive_dims.parquet").set_index("dim")
    assert dims.loc[[MASSIVE_DIM, LATE_DIM], "first_layer"].tolist() == [0, 1]
    assert dims.loc[[MASSIVE_DIM, LATE_DIM], "onset_layer"].tolist() == [0, 1]
    assert (dims["sequence_share"] == 1.0).all() and (dims["onset_share"] == 1.0).all()
    intervention = pd.read_parquet(tmp_path / "massive_intervention.parquet").set_index("intervention")
    assert intervention.loc["zero", "dim_layers"] == f"{LATE_DIM}:1 {MASSIVE_DIM}:0"
    assert intervention.loc["mean", "fill"] == MEAN_MEANING

    ids = torch.cat([torch.full((2, 1), BOS), torch.randint(2, 32, (2, 30), generator=torch.Generator().manual_seed(0))], 1)
    for fill, expected in (("zero", 0.0), ("mean", dims.loc[LATE_DIM, "mean_at_onset"])):
        after = Keep()
        backend.run(ids, reads={(1, Site.RESID_POST): after}, edits=massive_edits(backend, ids, dims.reset_index(), fill))
        late = after.result()[:, :, LATE_DIM]
        assert torch.allclose(late, torch.full_like(late, expected), atol=1e-3)  # every token carried it; each is overwritten
    plain = Keep()
    backend.run(ids, reads={(1, Site.RESID_POST): plain})
    assert plain.result()[:, :, LATE_DIM].abs().min() > 100


def test_a_dim_that_flickers_early_in_few_sequences_enters_at_its_onset():
    """Dim 5 is massive at layer 1 in 2 of 10 sequences (about 900) and from layer 3 on in all 10 (about
    20,000): it first appears at 1, its onset is 3, and the intervention's mean is the onset's value."""
    rows = [{"layer": 1, "sequence": s, "position": 7, "token": "x", "dim": 5, "value": 900.0, "median": 0.1, "ratio": 9e3}
            for s in range(2)]
    rows += [{"layer": layer, "sequence": s, "position": 0, "token": "<s>", "dim": 5, "value": 20000.0 + s, "median": 0.1,
              "ratio": 2e5} for layer in range(3, 6) for s in range(10)]
    rows += [{"layer": 2, "sequence": s, "position": 0, "token": "<s>", "dim": 5, "value": 5000.0, "median": 0.1, "ratio": 5e4}
             for s in range(4)]  # 4 of 10: below the onset share
    dims = first_layers(pd.DataFrame(rows), 10).set_index("dim")
    assert dims.loc[5, ["first_layer", "onset_layer"]].tolist() == [1, 3]
    assert dims.loc[5, "sequence_share"] == pytest.approx(0.2) and dims.loc[5, "onset_share"] == pytest.approx(1.0)
    assert dims.loc[5, "mean_at_onset"] == pytest.approx(20004.5) and dims.loc[5, "positions"] == "0"
    assert dims.loc[5, "max_abs"] == pytest.approx(20009.0)


def test_positions_count_only_at_the_layer_each_dim_is_given():
    """massive_positions with `layers` counts dim i's massive entries at layers[i] only."""
    model = model_with_a_late_dim()
    backend = NativeBackend(model)
    ids = torch.cat([torch.full((2, 1), BOS), torch.randint(2, 32, (2, 10), generator=torch.Generator().manual_seed(1))], 1)
    anywhere = massive_positions(backend, ids, [MASSIVE_DIM, LATE_DIM])
    assert anywhere[:, 0, 0].all() and anywhere[:, :, 1].all()  # BOS's dim from layer 0; the late dim on every token
    assert torch.equal(massive_positions(backend, ids, [MASSIVE_DIM, LATE_DIM], layers=[0, 1]), anywhere)
    none_late = massive_positions(backend, ids, [MASSIVE_DIM, LATE_DIM], layers=[0, 0])  # the late dim is not massive at 0
    assert torch.equal(none_late[:, :, 0], anywhere[:, :, 0]) and not none_late[:, :, 1].any()
