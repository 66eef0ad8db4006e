"""``splitlm bench``: the full model and the split measured side by side in one run.

``options`` parses and validates the command line, ``prompts`` makes prompts of exact token
lengths, ``measure`` runs the timed generations (full/split pairs through ``shared.comparison``),
``memory`` measures resident memory in fresh child processes, ``report`` turns the samples into
figures, goals, a table and Markdown, ``plots`` draws PNGs, and ``run`` wires them, starting the
bench's own daemon with ``shared.launcher``.
"""
