"""Experiments: ablation and the masking sweep, architectures and the mechanism-loss matrix, selectors and the exact-head budget sweep."""
