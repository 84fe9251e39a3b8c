"""The evaluation judge's instructions: one file per Video-ChatGPT dimension and one for
zero-shot QA, `system.txt` shared by all; templates with {named} slots (see benchmark.py)."""
