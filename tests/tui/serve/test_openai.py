"""``splitlm serve`` as its users meet it: a real daemon subprocess on the tiny chat model, a real
``splitlm serve`` subprocess (uvicorn) on a free loopback port with an API key, the official
``openai`` package, and httpx for the raw lines.

One daemon and one server for the module; replies are a few tokens. The daemon's own Prometheus
counters (``splitlm_positions_total``) say how many positions the trunk computed, which is how a
second turn is shown to step only its new tokens.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Daemon, free_port, reference_generate, run_cli, start_daemon

from .helpers import start_serve, stop_serve

pytestmark = pytest.mark.slow

KEY = "sk-test-serve-0123456789"
USER = [{"role": "user", "content": "the water is hot"}]


@dataclass
class Served:
    daemon: Daemon
    url: str
    daemon_metrics: str
    model: Path
    log: Path

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def metric(self, name: str, url: str | None = None) -> float:
        """One sample of a Prometheus exposition (the gateway's unless ``url``)."""
        text = httpx.get(url or f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        assert m, f"{name} not in {url or 'the gateway'}'s metrics"
        return float(m.group(1))

    def positions(self) -> float:
        """Positions the daemon's trunk has computed so far."""
        return self.metric("splitlm_positions_total", self.daemon_metrics)


@pytest.fixture(scope="module")
def served(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve")
    mport = free_port()
    daemon = start_daemon(chat_model, f"unix:{root / 'd.sock'}", root / "d.log", "--split", "2:4",
                          "--metrics", f"127.0.0.1:{mport}")
    key_file = root / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    log = root / "serve.log"
    try:
        proc, url = start_serve(daemon.address, chat_model, log, "--api-key-file", str(key_file))
    except BaseException:
        daemon.stop()
        raise
    try:
        yield Served(daemon, url, f"http://127.0.0.1:{mport}/metrics", chat_model, log)
    finally:
        stop_serve(proc)
        daemon.stop()


def test_start_log_says_what_is_exposed(served: Served) -> None:
    text = served.log.read_text()
    assert "this machine only (loopback)" in text and "an API key is required" in text


def test_models_and_chat_streamed_and_not(served: Served) -> None:
    c = served.client()
    models = [m.id for m in c.models.list().data]
    assert len(models) == 1
    r = c.chat.completions.create(model=models[0], messages=USER, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 4
    chunks = list(c.chat.completions.create(model=models[0], messages=USER, temperature=0, max_tokens=8,  # type: ignore[arg-type]
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == choice.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_greedy_chat_equals_splitlm_generate(served: Served) -> None:
    c = served.client()
    r = c.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    out = run_cli("generate", "--trunk", served.daemon.address, "--model", str(served.model), "--temperature", "0",
                  "--max-new-tokens", "8", USER[0]["content"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == r.choices[0].message.content + "\n"


def test_drafts_give_generates_reply_in_fewer_round_trips(served: Served, tmp_path: Path) -> None:
    """A gateway with ``--draft ngram`` verifies drafted chunks through the shared generation loop:
    the greedy reply is the undrafted ``splitlm generate``'s, and the daemon took fewer steps than
    the reply has tokens (a verified chunk is one round trip)."""
    prompt = "one two three one two three one two three"
    want = run_cli("generate", "--trunk", served.daemon.address, "--model", str(served.model), "--temperature",
                   "0", "--max-new-tokens", "24", "--json", prompt)
    assert want.returncode == 0, want.stderr
    want_text = json.loads(want.stdout)["text"]
    proc, url = start_serve(served.daemon.address, served.model, tmp_path / "draft.log", "--draft", "ngram")
    try:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        steps0 = served.metric("splitlm_steps_total", served.daemon_metrics)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],  # type: ignore[arg-type]
                                      temperature=0, max_tokens=24)
        steps = served.metric("splitlm_steps_total", served.daemon_metrics) - steps0
    finally:
        stop_serve(proc)
    assert r.choices[0].message.content == want_text
    assert r.usage is not None and steps < r.usage.completion_tokens, (steps, r.usage)


def test_completions_and_a_stop_string(served: Served) -> None:
    c = served.client()
    whole = c.completions.create(model="tiny", prompt="the water is", temperature=0, max_tokens=8)
    text = whole.choices[0].text
    words = text.split()
    assert len(words) >= 2, text
    stop = " " + words[1]
    cut = c.completions.create(model="tiny", prompt="the water is", temperature=0, max_tokens=8, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens > 0


def test_same_seed_same_sample(served: Served) -> None:
    c = served.client()

    def sample(seed: int) -> str:
        r = c.chat.completions.create(model="tiny", messages=USER, temperature=1.0, seed=seed, max_tokens=8)  # type: ignore[arg-type]
        return r.choices[0].message.content or ""

    a, b = sample(7), sample(7)
    assert a == b
    assert {sample(s) for s in (1, 2, 3, 4)} != {a}  # the seed matters


def test_logprobs(served: Served) -> None:
    c = served.client()
    r = c.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=4, logprobs=True,  # type: ignore[arg-type]
                                  top_logprobs=3)
    assert r.choices[0].logprobs is not None
    content = r.choices[0].logprobs.content or []
    assert r.usage is not None and len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)
    comp = c.completions.create(model="tiny", prompt="the water is", temperature=0, max_tokens=3, logprobs=2)
    lp = comp.choices[0].logprobs
    assert lp is not None and lp.token_logprobs and len(lp.top_logprobs or []) == len(lp.token_logprobs)


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"bogus": 1}, "bogus"),
])
def test_unsupported_or_bad_fields_get_openai_errors(served: Served, extra: dict[str, object], param: str) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 4, **extra}
    r = httpx.post(f"{served.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    if "n" in extra:  # and through the official client
        with pytest.raises(openai.BadRequestError):
            served.client().chat.completions.create(model="tiny", messages=USER, n=2, max_tokens=4)  # type: ignore[arg-type]


def test_wrong_or_missing_key_is_401(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        served.client("sk-wrong").models.list()
    assert e.value.status_code == 401
    r = httpx.get(f"{served.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{served.url}/health").status_code == 200  # probes need no key


def test_raw_sse_lines(served: Served) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_second_turn_steps_only_its_new_tokens(served: Served) -> None:
    from splitlm.shared.prepare import load_model

    model = load_model(str(served.model))
    tok = model.tokenizer
    c = served.client()
    turn1 = [{"role": "user", "content": "where is the city"}]
    r1 = c.chat.completions.create(model="tiny", messages=turn1, temperature=0, max_tokens=6)  # type: ignore[arg-type]
    turn2 = [*turn1, {"role": "assistant", "content": r1.choices[0].message.content or ""},
             {"role": "user", "content": "how far is the sea"}]
    ids1 = tok.apply_chat_template(turn1, add_generation_prompt=True, tokenize=True)["input_ids"]
    ids2 = tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=True)["input_ids"]
    before, stepped0 = served.positions(), served.metric("splitlm_serve_prompt_positions_stepped_total")
    r2 = c.chat.completions.create(model="tiny", messages=turn2, temperature=0, max_tokens=6)  # type: ignore[arg-type]
    computed = served.positions() - before
    stepped = served.metric("splitlm_serve_prompt_positions_stepped_total") - stepped0
    assert r2.usage is not None and r2.usage.prompt_tokens == len(ids2)
    assert stepped <= len(ids2) - len(ids1)  # turn 1's prompt (at least) came from the kept session
    # the trunk computed exactly those prompt positions and the reply's (its last token is not stepped)
    assert computed == stepped + r2.usage.completion_tokens - 1
    # and the reply is a fresh session's: the full model's greedy tokens for the whole prompt
    ref = reference_generate(served.model, list(ids2), 6)
    eos = set(model.eos_ids)
    ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    assert r2.choices[0].message.content == tok.decode(ref, skip_special_tokens=True)


def test_sixteen_concurrent_streams_complete(served: Served) -> None:
    c = served.client()
    results: dict[int, str | None] = {}

    def one(i: int) -> None:
        msgs = [{"role": "user", "content": f"tell me {i} things"}]
        finish = None
        for ch in c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=4, stream=True):  # type: ignore[arg-type]
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
        results[i] = finish

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(16))
    assert all(f in ("stop", "length") for f in results.values()), results


def test_a_disconnect_mid_stream_frees_the_session(served: Served) -> None:
    gone0 = served.metric("splitlm_serve_client_disconnects_total")
    before = served.positions()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "say a long story"}], "max_tokens": 3000,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # the role chunk and a few tokens, then hang up
    assert got[0].startswith("data: ")
    for _ in range(600):  # the reply stops at its next step, and the session is back in the pool
        if (served.metric("splitlm_serve_sessions_in_use") == 0
                and served.metric("splitlm_serve_client_disconnects_total") > gone0):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the session was not given back after the client went away")
    assert served.positions() - before < 3000  # stopped long before max_tokens
    r2 = served.client().chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=2)  # type: ignore[arg-type]
    assert r2.choices[0].finish_reason in ("stop", "length")


def test_health_and_metrics(served: Served) -> None:
    h = httpx.get(f"{served.url}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert served.metric('splitlm_serve_requests_total{endpoint="/v1/chat/completions",status="200"}') > 0
    assert served.metric("splitlm_serve_ttft_seconds_count") > 0
    assert served.metric("splitlm_serve_prefix_hits") > 0
    assert served.metric("splitlm_serve_token_delivery_seconds_count") > 0


def test_beyond_loopback_needs_a_key() -> None:
    out = run_cli("serve", "--listen", "0.0.0.0:8000", "--trunk", "unix:/nonexistent.sock")
    assert out.returncode == 2
    assert "--api-key-file" in out.stderr and "Traceback" not in out.stderr


def test_a_port_in_use_is_said_before_loading(served: Served) -> None:
    taken = served.url.removeprefix("http://")
    out = run_cli("serve", "--listen", taken, "--trunk", "unix:/nonexistent.sock")
    assert out.returncode == 2 and f"cannot listen at {taken}" in out.stderr and "Traceback" not in out.stderr
