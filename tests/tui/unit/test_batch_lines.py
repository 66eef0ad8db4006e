"""``generate --batch`` input lines (``tui.batch.parse_line``): the flags are the defaults, a line
overrides them, and every way a line can be wrong is named in its error."""

from __future__ import annotations

import io
import json

import pytest

from splitlm.shared.generation import GenerationSettings
from splitlm.shared.sampling import SamplingSettings
from splitlm.tui.batch import BadLine, Job, Progress, parse_line

DEFAULTS = GenerationSettings(max_new_tokens=32, stop=("END",), sampling=SamplingSettings(0.5, 10, 0.9, 7))


def _job(obj: object, chat: bool = True) -> Job:
    job = parse_line(3, json.dumps(obj), DEFAULTS, chat)
    assert isinstance(job, Job), job
    return job


def test_flags_are_defaults_and_a_line_overrides_them() -> None:
    job = _job({"prompt": "hi"})
    assert (job.line, job.id, job.prompt, job.chat, job.settings) == (3, None, "hi", True, DEFAULTS)
    job = _job({"prompt": "hi", "id": "a", "max_new_tokens": 4, "temperature": 0, "top_p": 1, "top_k": 0,
                "seed": 1, "stop": "\n", "no_chat": True})
    s = job.settings
    assert (job.id, job.chat, s.max_new_tokens, s.stop) == ("a", False, 4, ("\n",))
    assert s.sampling == SamplingSettings(0.0, 0, 1.0, 1)
    assert _job({"prompt": "hi", "stop": ["a", "b"]}, chat=False).settings.stop == ("a", "b")
    assert not _job({"prompt": "hi"}, chat=False).chat  # --no-chat
    messages = [{"role": "user", "content": "hi"}]
    assert _job({"messages": messages}).messages == tuple(messages)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"prompt": "a"', "not valid JSON"),
        ('["a"]', "expected a JSON object, got list"),
        ('{"id": 1}', 'missing "prompt"'),
        ('{"prompt": "  "}', "non-empty string"),
        ('{"prompt": "a", "messages": []}', "not both"),
        ('{"messages": [{"role": "user"}]}', '"messages"[0] must be'),
        ('{"messages": [{"role": "user", "content": "x"}], "no_chat": true}', "chat template"),
        ('{"prompt": "a", "max_tokens": 3}', "unknown key 'max_tokens'"),
        ('{"prompt": "a", "max_new_tokens": 0}', '"max_new_tokens" must be an integer >= 1, got 0'),
        ('{"prompt": "a", "temperature": "hot"}', '"temperature" must be a number >= 0'),
        ('{"prompt": "a", "top_p": 0}', '"top_p" must be a number in (0, 1], got 0'),
        ('{"prompt": "a", "top_k": 2.5}', '"top_k" must be an integer >= 0'),
        ('{"prompt": "a", "seed": true}', '"seed" must be an integer >= 0, got true'),
        ('{"prompt": "a", "stop": [""]}', '"stop" must be a non-empty string or a list'),
        ('{"prompt": "a", "no_chat": 1}', '"no_chat" must be true or false'),
    ],
)
def test_bad_lines_say_what_is_wrong(text: str, error: str) -> None:
    bad = parse_line(9, text, DEFAULTS, True)
    assert isinstance(bad, BadLine) and bad.line == 9
    assert error in bad.error, bad.error


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_only_on_a_terminal() -> None:
    term, pipe = _Terminal(), io.StringIO()
    for stream in (term, pipe):
        p = Progress(6, stream)
        p.show(2, 1, 4, 30)
        p.show(6, 1, 0, 50)
        p.close()
    first, second = term.getvalue().split("\r")[1:]
    assert first.startswith("batch: 2/6 done, 1 failed, 4 running, 30 tokens, ")
    assert second.startswith("batch: 6/6 done, 1 failed, 0 running, 50 tokens, ") and second.endswith("\n")
    assert pipe.getvalue() == ""
