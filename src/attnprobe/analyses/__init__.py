"""Experiments and outputs: recall tasks, ablation sweeps, swaps, figures, report, CLI."""
