"""Training never takes the forward-only Triton kernels, and its logits equal the Triton inference path's
(on CPU through Triton's interpreter; this module sorts after test_triton.py, whose fixture it reuses)."""
from __future__ import annotations

import pytest
import torch

from test_triton import kernels  # noqa: F401  (the interpreter fixture)

pytest.importorskip("triton", reason="triton is not installed on this platform")


def test_training_takes_torch_forms_and_equals_the_triton_inference_path(kernels, monkeypatch):  # noqa: F811
    from attnprobe.analyses.conversion.train import Student
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.swap import kernel_edit
    from attnprobe.kernels import dispatch, triton_linear
    from attnprobe.kernels.registry import make_kernel
    from test_backends import TinyTokenizer, tiny_llama, wrap

    hf = tiny_llama()
    backend = make_backend("native", wrap(hf, TinyTokenizer()))
    heads = {0: [0, 3], 2: [0, 1, 2, 3]}  # a mixed layer (hybrid launch) and a layer replaced whole (chunked kernel)
    torch.manual_seed(3)
    replacements = {layer: make_kernel("hedgehog", len(h), 16) for layer, h in heads.items()}
    with torch.no_grad():
        for kernel in replacements.values():
            for weight in (kernel.feature_map.query_weight, kernel.feature_map.key_weight):
                weight.add_(0.3 * torch.randn_like(weight))
    launches = []
    for name in ("chunked_linear_attention", "hybrid_attention"):
        original = getattr(triton_linear, name)
        monkeypatch.setattr(triton_linear, name, lambda *a, original=original, **kw: launches.append(1) or original(*a, **kw))
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(18))
    with dispatch.triton_on_cpu():
        inference = backend.run(ids, edits=[kernel_edit(layer, h, replacements[layer]) for layer, h in heads.items()])
    assert len(launches) == 2
    launches.clear()
    for length in (40, 4096):  # the quadratic form, and the chunked prefill beyond QUADRATIC_UP_TO
        student = Student(hf, replacements, heads, length)
        with dispatch.triton_on_cpu(), backend.patched(student.edits), dispatch.differentiable():
            logits = student(ids)
        assert not launches and logits.requires_grad
        torch.testing.assert_close(logits, inference, atol=1e-4, rtol=1e-4)
        logits.square().mean().backward()
        assert all(weight.grad.abs().sum() > 0 for kernel in replacements.values()
                   for weight in (kernel.feature_map.query_weight, kernel.feature_map.key_weight))
        for kernel in replacements.values():
            kernel.zero_grad()
