"""Triton kernels on the CPU through Triton's interpreter (CI has no GPU), for the kernel tests.

TRITON_INTERPRET is read when a function is decorated with triton.jit, so a test module sets it before its
first triton import and reloads its kernel modules under `interpreted`. Where triton was imported earlier in
the session (transformers imports it), triton's own library functions (tl.sum, tl.zeros, ...) are
compiled-mode objects that refuse to be called; every jit call is then routed through the interpreter for the
block. Afterwards the modules are reloaded again, so later tests see the compiled kernels.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager

import pytest


@contextmanager
def interpreted(*modules):
    """The kernel `modules` reloaded under the interpreter for the block; yields the reloaded modules."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.setattr(JITFunction, "__call__", lambda self, *args, **kwargs: InterpretedFunction(self.fn)(*args, **kwargs))
        reloaded = [importlib.reload(module) for module in modules]
        try:
            yield reloaded
        finally:
            patch.undo()
            for module in reloaded:
                importlib.reload(module)
