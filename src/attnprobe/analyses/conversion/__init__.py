"""Conversion of softmax heads to other kernels: training data, the two-stage training loop, converted rows."""
