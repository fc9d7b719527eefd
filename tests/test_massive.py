"""Massive activations: every dim is found where it first appears, and the intervention covers each one there."""
import pandas as pd
import torch

from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.hooks.reducers import Keep
from attnprobe.hooks.sites import Site
from attnprobe.probe.census import Census, CensusConfig
from attnprobe.probe.massive import MEAN_MEANING, massive_edits

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


def test_each_dim_is_overwritten_at_its_own_first_layer(tmp_path):
    model = model_with_a_late_dim()
    backend = NativeBackend(model)
    config = CensusConfig(massive_sequences=6, massive_length=48, perplexity_tokens=128, perplexity_length=64)
    Census(model, backend, config, tmp_path).execute(("massive", "massive_intervention"))
    dims = pd.read_parquet(tmp_path / "massive_dims.parquet").set_index("dim")
    assert dims.loc[[MASSIVE_DIM, LATE_DIM], "first_layer"].tolist() == [0, 1]
    assert (dims["sequence_share"] == 1.0).all()
    intervention = pd.read_parquet(tmp_path / "massive_intervention.parquet").set_index("intervention")
    assert intervention.loc["zero", "dim_layers"] == f"{LATE_DIM}:1 {MASSIVE_DIM}:0"
    assert intervention.loc["mean", "fill"] == MEAN_MEANING

    ids = torch.cat([torch.full((2, 1), BOS), torch.randint(2, 32, (2, 30), generator=torch.Generator().manual_seed(0))], 1)
    for fill, expected in (("zero", 0.0), ("mean", dims.loc[LATE_DIM, "mean_at_first_layer"])):
        after = Keep()
        backend.run(ids, reads={(1, Site.RESID_POST): after}, edits=massive_edits(backend, ids, dims.reset_index(), fill))
        late = after.result()[:, :, LATE_DIM]
        assert torch.allclose(late, torch.full_like(late, expected), atol=1e-3)  # every token carried it; each is overwritten
    plain = Keep()
    backend.run(ids, reads={(1, Site.RESID_POST): plain})
    assert plain.result()[:, :, LATE_DIM].abs().min() > 100
