"""The torch form of fla's gated chunk_bwd_dqkwg (kernels/fla_gated_backward.py) against autograd through the
chunked gated delta rule it differentiates, written out here: per chunk c with start state h_c,
    v_new = u - w h_c
    o     = scale (q * 2^g) h_c + scale tril((q k^T) * 2^(g_i - g_j)) v_new
    h_c+1 = 2^g_last h_c + (k * 2^(g_last - g))^T v_new
with g the chunk-local cumulative log2 gate. The form gets h_c, the gradient of h_c+1, v_new and its total
gradient, as fla's backward hands them over, and must return the gradients of q, k, w and the gates."""
import math

import pytest
import torch

from attnprobe.kernels.fla_gated_backward import chunk_bwd_dqkwg

BT = 16


def chunked_forward(q, k, w, u, g, scale):
    """o and the tensors fla's backward passes to chunk_bwd_dqkwg (h, v_new, kept for their gradients)."""
    B, T, H, K = q.shape
    HV, V = u.shape[2], u.shape[3]
    group = HV // H
    qh, kh = q.repeat_interleave(group, 2), k.repeat_interleave(group, 2)
    state = torch.zeros(B, HV, K, V, dtype=q.dtype, requires_grad=True)  # a leaf: every later tensor has a gradient
    outputs, starts, ends, news = [], [], [], []
    for start in range(0, T, BT):
        end = min(start + BT, T)
        qc, kc, wc, uc, gc = (x[:, start:end].transpose(1, 2) for x in (qh, kh, w, u, g[..., None]))
        gc = gc[..., 0]  # (B, HV, n)
        starts.append(state)
        v_new = uc - wc @ state
        v_new.retain_grad()
        news.append(v_new)
        decay = torch.exp2(gc[..., :, None] - gc[..., None, :]).tril()
        o = scale * ((qc * torch.exp2(gc)[..., None]) @ state + ((qc @ kc.transpose(-1, -2)) * decay) @ v_new)
        outputs.append(o.transpose(1, 2))
        g_last = gc[..., -1:]
        state = torch.exp2(g_last)[..., None] * state + (kc * torch.exp2(g_last - gc)[..., None]).transpose(-1, -2) @ v_new
        state.retain_grad()
        ends.append(state)
    return torch.cat(outputs, 1), starts, ends, news


def gradient(state):
    """The final state feeds nothing: its gradient is zero."""
    return torch.zeros_like(state) if state.grad is None else state.grad


@pytest.mark.parametrize("T, H, HV, v_first", [(48, 2, 2, False), (37, 2, 2, True), (40, 1, 2, False)])
def test_the_torch_form_equals_autograd_through_the_chunked_gated_delta_rule(T, H, HV, v_first):
    torch.manual_seed(0)
    B, K, V = 2, 8, 6
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    w, u = torch.randn(B, T, HV, K, dtype=torch.float64) * 0.3, torch.randn(B, T, HV, V, dtype=torch.float64)
    raw = -torch.rand(B, T, HV, dtype=torch.float64) * 0.2
    g = torch.cat([raw[:, s:s + BT].cumsum(1) for s in range(0, T, BT)], 1)  # chunk-local cumulative
    for x in (q, k, w, u, g):
        x.requires_grad_()
    scale = K ** -0.5
    o, starts, ends, news = chunked_forward(q, k, w, u, g, scale)
    do = torch.randn_like(o)
    (o * do).sum().backward()

    def per_chunk(states):  # list of (B, HV, K, V) -> (B, NT, HV, K, V), or V-first
        stacked = torch.stack(states, 1)
        return stacked.transpose(-1, -2).contiguous() if v_first else stacked
    h = per_chunk([s.detach() for s in starts])
    dh = per_chunk([gradient(e) for e in ends])
    v_new = torch.cat([n.detach().transpose(1, 2) for n in news], 1)
    dv = torch.cat([n.grad.transpose(1, 2) for n in news], 1)

    dq, dk, dw, dg = chunk_bwd_dqkwg(q=q.detach(), k=k.detach(), v=v_new, do=do, h=h, dh=dh, w=w.detach(), g=g.detach(),
                                     dv=dv, scale=scale, state_v_first=v_first, chunk_size=BT)
    assert math.ceil(T / BT) == h.shape[1]
    for name, ours, reference in (("dq", dq, q.grad), ("dk", dk, k.grad), ("dw", dw, w.grad)):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9, msg=name)
    # fla's dg is the gradient of the natural-log gate (its exp2 takes g / ln 2): ours times ln 2 here
    torch.testing.assert_close(dg * math.log(2), g.grad, rtol=1e-9, atol=1e-9)


def test_without_a_gate_it_is_the_plain_chunked_gradient():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 35, 2, 4, 4
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    u = torch.randn(B, T, H, V, dtype=torch.float64)
    w = torch.zeros(B, T, H, K, dtype=torch.float64)
    g = torch.zeros(B, T, H, dtype=torch.float64)
    for x in (q, k):
        x.requires_grad_()
    o, starts, ends, news = chunked_forward(q, k, w, u, g, 0.5)
    do = torch.randn_like(o)
    (o * do).sum().backward()
    h, dh = torch.stack([s.detach() for s in starts], 1), torch.stack([gradient(e) for e in ends], 1)
    dq, dk, dw, dg = chunk_bwd_dqkwg(q=q.detach(), k=k.detach(), v=u, do=do, h=h, dh=dh, scale=0.5, chunk_size=BT)
    assert dw is None and dg is None
    torch.testing.assert_close(dq, q.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dk, k.grad, rtol=1e-9, atol=1e-9)


def test_it_refuses_what_it_does_not_cover():
    x = torch.zeros(1, 16, 1, 4)
    with pytest.raises(NotImplementedError):
        chunk_bwd_dqkwg(x, x, x, x, torch.zeros(1, 1, 1, 4, 4), torch.zeros(1, 1, 1, 4, 4), g=torch.zeros(1, 16, 1),
                        cu_seqlens=torch.tensor([0, 16]))


def test_fla_dispatches_the_refused_call_to_the_torch_form(monkeypatch):
    """Registered in fla's backend registry, the form answers fla's own chunk_bwd_dqkwg where its Triton kernel
    would refuse (simulated here), and declines every other call."""
    pytest.importorskip("fla")
    from attnprobe.kernels import fla_gated_backward

    fla_gated_backward.register()
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg as fla_chunk_bwd_dqkwg

    torch.manual_seed(2)
    B, T, H, K, V = 1, 20, 1, 4, 4
    args = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V), do=torch.randn(B, T, H, V),
                h=torch.randn(B, 2, H, K, V), dh=torch.randn(B, 2, H, K, V), w=torch.randn(B, T, H, K),
                g=-torch.rand(B, T, H), dv=torch.randn(B, T, H, V), scale=0.5, chunk_size=BT)
    monkeypatch.setattr(fla_gated_backward, "triton_refuses", lambda g: True)
    for ours, theirs in zip(chunk_bwd_dqkwg(**args), fla_chunk_bwd_dqkwg(**args)):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    from fla.backends import _get_operation_registry

    backend = _get_operation_registry("common")._backends["attnprobe_torch"]
    monkeypatch.setattr(fla_gated_backward, "triton_refuses", lambda g: g is not None)
    assert backend.verify("chunk_bwd_dqkwg", **{**args, "g": None})[0] is False
    assert backend.verify("chunk_bwd_dqkwg", **{**args, "cu_seqlens": torch.tensor([0, T])})[0] is False
    assert backend.verify("chunk_bwd_dqkwg", **args) == (True, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's chunked ops run on CUDA")
@pytest.mark.parametrize("name", ["decay", "gated-deltanet"])
def test_the_gated_families_train_through_fla_on_this_gpu(name):
    """fla's chunked backward of scalar decay and Gated DeltaNet, with the torch form where fla's Triton refuses,
    agrees with our fp32 torch form (kernels.fla.trains: within 2 % relative RMS in every input gradient)."""
    pytest.importorskip("fla")
    from attnprobe.kernels import fla
    from attnprobe.kernels.registry import make_kernel

    kernel = make_kernel(name, 9, 64).cuda()
    like = torch.zeros(1, 9, 2048, 64, device="cuda", dtype=torch.bfloat16)
    assert fla.trains(kernel, like), f"{name}: relative gradient error {fla.backward_errors}"
