"""Attention math, one folder per kernel family (softmax, linear, gla, decay, deltanet, hybrid) on
`base.Kernel`, named in `registry`; fitting (`fit`), the softmax statistics and the Triton kernels."""
