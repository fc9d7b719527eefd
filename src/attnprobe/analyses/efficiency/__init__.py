"""Efficiency: what a decode step and a prefill cost (time, peak memory, bytes moved against the memory bound)."""
