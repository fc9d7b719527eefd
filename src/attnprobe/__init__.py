"""attnprobe: which attention mechanisms survive when softmax heads become linear, sparse or hybrid.

Rooms, lowest first: `kernels` (attention math), `hooks` (getting into a model), `probe` (what is measured),
`analyses` (experiments, conversion, presentation, CLI). `errors` and `io` are the shared leaves.
Importing this package imports nothing heavy (no torch), so `attnprobe --help` answers at once.
"""
