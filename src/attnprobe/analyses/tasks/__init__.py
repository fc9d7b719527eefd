"""Recall tasks in a registry: one module per task (passkey, niah, kv_recall, copying and RULER's
suite), each declaring a `TASKS` tuple that `registry.tasks()` collects; the evaluation pools and
their disjointness check live in `pools`. See registry.py for how to add a task."""
from attnprobe.analyses.tasks import pools
from attnprobe.analyses.tasks.registry import (COLUMNS, Sample, Setting, Task, build, evaluate, help_text, names,
                                               preflight, run_sized, sized, task, tasks)

DEFAULT = ("passkey", "kv_recall", "copying", "niah")  # the matrix's tasks unless --tasks says otherwise

__all__ = ["COLUMNS", "DEFAULT", "pools", "Sample", "Setting", "Task", "build", "evaluate", "help_text", "names", "preflight",
           "run_sized", "sized", "task", "tasks"]
