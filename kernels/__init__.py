"""Attention math: softmax reference, linear feature maps, hybrids, fitting, Triton kernels."""
