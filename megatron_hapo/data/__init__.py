"""Datasets and tasks. `addition`: the embedded demo task, generated in code."""
