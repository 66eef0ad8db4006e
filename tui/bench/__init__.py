"""``splitlm bench``: the full model and the split measured side by side in one run.

``options`` parses and validates the command line, ``prompts`` makes prompts of exact token
lengths, ``trunkd`` starts and stops the daemon the bench owns, ``measure`` runs the timed
generations, ``memory`` measures resident memory in fresh child processes, ``report`` turns the
samples into figures, goals, a table and Markdown, ``plots`` draws PNGs, and ``run`` wires them.
"""
