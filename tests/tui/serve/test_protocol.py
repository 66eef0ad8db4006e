"""Request bodies to settings, or to OpenAI's 400 naming the field: pure, no server."""

from __future__ import annotations

import pytest

from splitlm.tui.serve.protocol import ApiError, Defaults, parse_chat, parse_completion

MSGS = [{"role": "user", "content": "hi"}]
D = Defaults(max_tokens=99, temperature=0.0)


def test_fields_become_settings() -> None:
    r = parse_chat({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be"},
                    {"type": "text", "text": " brief"}]}, *MSGS], "max_tokens": 5, "max_completion_tokens": 7,
                    "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "x", "logprobs": True, "top_logprobs": 2,
                    "stream": True, "stream_options": {"include_usage": True}, "user": "u"}, D)
    assert r.messages[0] == {"role": "system", "content": "be brief"}
    s = r.settings
    assert (s.max_new_tokens, s.stop, s.sampling.temperature, s.sampling.top_p, s.sampling.seed) == (7, ("x",), 0.5, 0.9, 3)
    assert r.logprobs == 2 and r.stream and r.include_usage
    d = parse_chat({"model": "m", "messages": MSGS}, D)
    assert d.settings.max_new_tokens == 99 and d.logprobs is None and not d.stream
    c = parse_completion({"model": "m", "prompt": ["one"], "logprobs": 0, "stop": ["a", "b"]}, D)
    assert c.prompt == "one" and c.logprobs == 0 and c.settings.stop == ("a", "b")


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": MSGS, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": MSGS, "top_p": 0}, "top_p"),
    ({"messages": MSGS, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": MSGS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ({"messages": []}, "messages"),
    ({"messages": MSGS, "model": 3}, "model"),
])
def test_chat_refusals_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_chat({"model": "m", **body}, D)
    assert e.value.status == 400 and e.value.param == param and e.value.body()["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({"prompt": "a", "best_of": 2}, "best_of"),
    ({"prompt": "a", "suffix": "z"}, "suffix"), ({"prompt": "a", "logprobs": 6}, "logprobs"), ({}, "prompt"),
])
def test_completion_refusals_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_completion({"model": "m", **body}, D)
    assert e.value.param == param
