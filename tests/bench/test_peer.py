"""The bench's peer (``tui/bench/peer.py``) and the floor rows in the summary: P8 from the peer
measured in the same run, the cited fallback marked as cited, the summary's declared shape; and,
where ``make bench-peer`` installed llama-cpp-python, one short real llama.cpp run on SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from splitlm.tui.bench import floor, peer, report
from splitlm.tui.bench.summary import Summary
from tests.bench.test_report import _conforms, _sample

SAMPLES = [_sample("full", 16, 0.010), _sample("split", 16, 0.012), _sample("full", 64, 0.010),
           _sample("split", 64, 0.012)]


def _peer_samples() -> list[peer.PeerSample]:
    return [peer.PeerSample(0, 16, 0.05, (0.004, 0.004), 7.0, 2, 40.0, (5, 6, 7)),
            peer.PeerSample(0, 64, 0.09, (0.004, 0.004), 9.0, 2, 80.0, (5, 9, 9))]


def test_p8_uses_the_peer_measured_in_the_run() -> None:
    full_tokens = {(s.round, s.prompt_len): s.token_ids for s in SAMPLES if s.mode == "full"}
    ps = peer.summarise(_peer_samples(), "0.3.36", Path("m.gguf"), 2, 0.010, 0.012, full_tokens)
    assert ps["per_token_p50_s"] == pytest.approx(0.004)
    assert ps["llama_eval_ms_per_token"] == pytest.approx(16.0 / 4)  # llama.cpp's own counter, pooled
    assert ps["split_over_peer"] == pytest.approx(3.0) and ps["full_over_peer"] == pytest.approx(2.5)
    assert ps["agreement_with_full_percent"] == pytest.approx(100 * 4 / 6)
    assert ps["by_prompt_length"]["64"]["ttft_p50_s"] == pytest.approx(0.09)
    bw = floor.Bandwidth(read_bytes_per_s=2e3, matvec_bytes_per_s=1e3, bytes_per_s=2e3, threads=2,
                         read_bytes=1, matvec_bytes=1, matvec_shape=[1536, 576])
    fl = floor.summarise(bw, {"full": floor.DecodeBytes(10, 5, 5, 1), "client": floor.DecodeBytes(4, 5, 5, 1),
                              "trunk": floor.DecodeBytes(6, 0, 0, 0)},
                         {"full_decode": ("full", 0.010), "split_decode": ("full", 0.012)})
    s = report.summarise(SAMPLES, [], hidden=8, itemsize=4, memory={}, chat=None, floor=fl, peer=ps)
    _conforms(s, Summary, "summary")
    p8 = {g["id"]: g for g in s["goals"]}["P8"]
    assert p8["value"] == pytest.approx(3.0) and p8["passed"] is False
    assert "measured in this run" in p8["figure"] and "cited" not in p8["figure"]
    assert s["floor"] is not None and s["floor"]["over_floor"]["full_decode"] == pytest.approx(0.010 / 0.01)
    table = report.text_table(s, "t")
    assert "llama.cpp (llama-cpp-python 0.3.36) on the same GGUF, 2 thread(s)" in table
    assert "decode ms/token p50 / floor (full, split)" in table
    md = report.markdown(s, _meta(), {})
    assert "| per-token latency p50 (ms) | 4.00 | 2.500 | 3.000 |" in md


def test_without_the_peer_p8_is_the_cited_figure_and_says_so() -> None:
    s = report.summarise(SAMPLES, [], hidden=8, itemsize=4, memory={}, chat=None,
                         peer_skipped="llama-cpp-python is not installed; make bench-peer")
    _conforms(s, Summary, "summary")
    p8 = {g["id"]: g for g in s["goals"]}["P8"]
    assert p8["value"] == pytest.approx(12.0 / peer.LLAMA_CPP_MS_PER_TOKEN)
    assert "cited, not measured" in p8["figure"]
    assert "llama.cpp peer: not measured (llama-cpp-python is not installed; make bench-peer)" in report.text_table(s, "t")
    assert "was not measured in this run" in report.markdown(s, _meta(), {})


def test_missing_reason() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        assert "make bench-peer" in (peer.missing_reason(Path("m.gguf"), "gguf") or "")
    else:
        assert peer.missing_reason(Path("m.gguf"), "gguf") is None
        assert "GGUF files only" in (peer.missing_reason(Path("d"), "safetensors") or "")


def _meta() -> dict[str, object]:
    return {"command": "splitlm bench", "started": "now", "elapsed_s": 1.0,
            "settings": {"trunk": None, "repeats": 1, "warmup": 0, "new_tokens": 3, "concurrency": [1], "quick": False},
            "plan": {"model": "m", "layers": 6, "hidden_size": 8, "split": [2, 4], "dtype": "float32",
                     "wire_dtype": "float32"},
            "threads": {"client": 1, "daemon": 1}, "machine": {"cpus": 2, "torch": "x", "python": "3"},
            "prompt_lengths": [16, 64]}


@pytest.mark.realmodel
def test_llama_cpp_on_smollm2(smollm2_path: Path) -> None:
    """The real peer: greedy tokens from the bundled GGUF, llama.cpp's own counters filled."""
    pytest.importorskip("llama_cpp")
    ticks: list[str] = []
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 30]  # SmolLM2 ids: a short chat prefix
    samples, version = peer.run_peer(smollm2_path, {8: prompt}, 4, 0, 2, 1, ticks.append)
    assert version and ticks == ["llama.cpp (its own process)"]  # out of the bench's OMP_WAIT_POLICY
    assert [len(s.token_ids) for s in samples] == [4, 4] and [len(s.per_token_s) for s in samples] == [3, 3]
    assert samples[0].token_ids == samples[1].token_ids  # a fresh state each run: the same greedy reply
    assert all(s.eval_tokens == 3 and s.eval_ms > 0 and s.prompt_eval_ms > 0 for s in samples)
