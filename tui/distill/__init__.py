"""``splitlm distill``: train a draft for speculative decoding from the served model's weights.

``data`` reads ``--data`` or has the teacher continue the shipped prompt set (``prompts.jsonl``),
``train`` holds the teacher, the students (bridge, standalone), the loss and the evaluation, and
``run`` wires them with checkpoints, resume, the progress bar and the loss-curve PNG. The student
format and the drafter that runs it are ``shared.draft.student`` (every face drafts with it).
"""
