"""The peer, measured side by side: llama.cpp decoding the same GGUF in the same bench run.

Issue 6 cited llama.cpp's decode time on this machine (9.7 ms/token) as P8's reference; issue 13
asks for it measured in the same run, on the same file, with the same threads, prompts and token
counts as the bench's single-session runs. llama.cpp is an optional extra (``pip install
'splitlm[peer]'``, or ``make bench-peer``: llama-cpp-python built from source), never part of
``make install``; without it the bench says so in one line and P8 falls back to the cited figure,
marked as cited.

Each run: a fresh context state (``Llama.reset``: the KV cache is cleared from position 0), the
prompt's token ids evaluated in one batch, then one token at a time, greedy (the argmax of the
last position's logits, as the bench's own greedy sampler does), exactly ``new_tokens`` tokens;
no end token stops it. Timed here with ``perf_counter`` around each step exactly like the bench's
generation loop (TTFT: prompt evaluation + the first argmax; per token: one evaluation + argmax),
and llama.cpp's own performance counters (``llama_perf_context``: prompt and decode milliseconds)
are recorded beside them. The prompts are the bench's token ids, fed straight in (same
tokenizer: both read the GGUF's vocabulary), so greedy agreement with the full model is reported
too; it is not expected to be 100 %: llama.cpp computes Q4_1 dot products against activations it
rounds to 8 bits, the bench dequantises the weights to its own precision.

Who calls: ``run`` on the main thread, after the full/split runs (the peer's threads and torch's
never compute at once).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

from ...shared.stats import percentile, ratio

log = logging.getLogger(__name__)

NAN = float("nan")

PEER_CHOICES = ("auto", "llama.cpp", "off")
"""``--peer``: ``auto`` measures llama.cpp when it is installed and the model is a GGUF file
(saying why not otherwise), ``llama.cpp`` insists (exit 2 when it cannot), ``off`` skips it."""

INSTALL_HINT = "make bench-peer (or: pip install 'splitlm[peer]')"

LLAMA_CPP_MS_PER_TOKEN = 9.7
"""Issue 6's reference when the peer is not measured: llama.cpp decoding the same SmolLM2 Q4_1
GGUF on this machine (2 threads), measured by a peer with llama.cpp's own benchmark tool."""


def missing_reason(model_path: Path | None, kind: str | None) -> str | None:
    """Why the peer cannot run here (None: it can): llama-cpp-python absent, or a model that is
    not a GGUF file (llama.cpp reads only GGUF)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed; {INSTALL_HINT}"
    if kind != "gguf" or model_path is None:
        return "llama.cpp reads GGUF files only, and this model is not one"
    return None


@dataclass(frozen=True)
class PeerSample:
    """One recorded llama.cpp generation (seconds; the counters' milliseconds as llama.cpp reports).

    Attributes:
        round, prompt_len: as the bench's ``RunSample``.
        ttft_s, per_token_s: timed here around each step.
        eval_ms, eval_tokens: llama.cpp's own decode time and count (one-token evaluations).
        prompt_eval_ms: llama.cpp's own prompt evaluation time.
        token_ids: the generated tokens.
    """

    round: int
    prompt_len: int
    ttft_s: float
    per_token_s: tuple[float, ...]
    eval_ms: float
    eval_tokens: int
    prompt_eval_ms: float
    token_ids: tuple[int, ...]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp's C code writes its load log to fd 2 even with ``verbose=False`` in some builds;
    the bench's stderr carries its progress, so the file descriptor is pointed at /dev/null while
    the model loads."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LlamaCppPeer:
    """One llama.cpp model and context on ``path``, sized for ``n_ctx`` positions."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        with _quiet_stderr():
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                       n_threads_batch=threads, verbose=False)
        self.threads = threads
        self.n_vocab = int(self.llm.n_vocab())
        self.version = str(getattr(llama_cpp, "__version__", "?"))

    def _argmax(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, ids: Sequence[int], new_tokens: int, round_: int) -> PeerSample:
        """One greedy run of exactly ``new_tokens`` tokens from a fresh state."""
        lib, llm = self._lib, self.llm
        llm.reset()
        lib.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter()
        llm.eval(list(ids))
        tok = self._argmax()
        ttft = time.perf_counter() - t0
        out, per_token = [tok], []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            llm.eval([tok])
            tok = self._argmax()
            per_token.append(time.perf_counter() - t)
            out.append(tok)
        perf = lib.llama_perf_context(llm.ctx)
        return PeerSample(round_, len(ids), ttft, tuple(per_token), float(perf.t_eval_ms), int(perf.n_eval),
                          float(perf.t_p_eval_ms), tuple(out))

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if callable(close):
            close()


def run_peer(
    path: Path,
    prompts: dict[int, list[int]],
    new_tokens: int,
    warmup: int,
    repeats: int,
    threads: int,
    tick: Callable[[str], None],
) -> tuple[list[PeerSample], str]:
    """Every prompt length, ``warmup`` dropped rounds then ``repeats`` recorded ones, as the
    bench's single-session runs; returns the samples and llama-cpp-python's version.

    llama.cpp runs in a child process with OpenMP's wait policy as llama.cpp's own tools leave it:
    the bench process sets ``OMP_WAIT_POLICY=PASSIVE`` (for torch, so idle threads do not spin on
    the daemon's core), and ggml, whose threads meet at a barrier after every graph node, runs 3x
    slower under it (SmolLM2 Q4_1, 2 threads: 32.5 ms a token against 10.7). Nothing else runs
    while it does.

    Raises:
        RuntimeError: the child failed (its stderr's end in the message).
    """
    import json
    import os
    import subprocess
    import sys

    tick("llama.cpp (its own process)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    request = {"path": str(path), "prompts": {str(n): ids for n, ids in prompts.items()}, "new_tokens": new_tokens,
               "warmup": warmup, "repeats": repeats, "threads": threads}
    r = subprocess.run([sys.executable, "-m", "splitlm.tui.bench.peer"], input=json.dumps(request),
                       capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp's run exited {r.returncode}: {r.stderr[-1500:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    samples = [PeerSample(d["round"], d["prompt_len"], d["ttft_s"], tuple(d["per_token_s"]), d["eval_ms"],
                          d["eval_tokens"], d["prompt_eval_ms"], tuple(d["token_ids"])) for d in out["samples"]]
    return samples, str(out["version"])


def _run_here(
    path: Path, prompts: dict[int, list[int]], new_tokens: int, warmup: int, repeats: int, threads: int
) -> tuple[list[PeerSample], str]:
    """``run_peer``'s runs, in this process (the child's side)."""
    peer = LlamaCppPeer(path, max(prompts) + new_tokens, threads)
    try:
        samples = []
        for r in range(-warmup, repeats):
            for n in sorted(prompts):
                s = peer.generate(prompts[n], new_tokens, r)
                if r >= 0:
                    samples.append(s)
        return samples, peer.version
    finally:
        peer.close()


def _child() -> int:
    """``python -m splitlm.tui.bench.peer``: a JSON request on stdin, the samples as JSON on stdout."""
    import dataclasses
    import json
    import sys

    req = json.loads(sys.stdin.read())
    samples, version = _run_here(Path(req["path"]), {int(n): ids for n, ids in req["prompts"].items()},
                                 req["new_tokens"], req["warmup"], req["repeats"], req["threads"])
    print(json.dumps({"version": version, "samples": [dataclasses.asdict(s) for s in samples]}))
    return 0


class PeerLengthFigures(TypedDict):
    """One prompt length (seconds)."""

    ttft_p50_s: float
    per_token_p50_s: float
    prompt_eval_ms_p50: float


class PeerSummary(TypedDict):
    """``summary.peer``: llama.cpp on the same GGUF in the same run.

    ``per_token_p50_s``/``_p95_s`` are timed as the bench times its own tokens, pooled over every
    prompt length; ``llama_eval_ms_per_token`` is llama.cpp's own counter (decode time / decode
    tokens, pooled); ``agreement_with_full_percent`` is greedy tokens matching the bench's full
    model run for run (same round and prompt); ``full_over_peer``/``split_over_peer`` are the
    bench's per-token p50s over the peer's.
    """

    engine: str
    version: str
    model_path: str
    threads: int
    runs: int
    decode_tokens: int
    per_token_p50_s: float
    per_token_p95_s: float
    tokens_per_s: float
    llama_eval_ms_per_token: float
    by_prompt_length: dict[str, PeerLengthFigures]
    agreement_with_full_percent: float
    full_over_peer: float
    split_over_peer: float


def summarise(
    samples: Sequence[PeerSample], version: str, path: Path | str, threads: int,
    full_p50_s: float, split_p50_s: float, full_tokens: dict[tuple[int, int], tuple[int, ...]],
) -> PeerSummary:
    """The peer's figures, and the bench's per-token p50s over its own.

    Args:
        full_tokens: the bench's full-model tokens by (round, prompt length).
    """
    from ...shared.comparison import Agreement, pooled_agreement

    lat = [x for s in samples for x in s.per_token_s]
    lengths = sorted({s.prompt_len for s in samples})
    p50 = percentile(lat, 0.5)
    pooled = pooled_agreement(Agreement.of(full_tokens[(s.round, s.prompt_len)], s.token_ids)
                              for s in samples if (s.round, s.prompt_len) in full_tokens)
    n_eval = sum(s.eval_tokens for s in samples)
    return PeerSummary(
        engine="llama.cpp", version=version, model_path=str(path), threads=threads, runs=len(samples),
        decode_tokens=len(lat), per_token_p50_s=p50, per_token_p95_s=percentile(lat, 0.95),
        tokens_per_s=len(lat) / sum(lat) if lat else NAN,
        llama_eval_ms_per_token=sum(s.eval_ms for s in samples) / n_eval if n_eval else NAN,
        by_prompt_length={
            str(n): PeerLengthFigures(
                ttft_p50_s=percentile([s.ttft_s for s in samples if s.prompt_len == n], 0.5),
                per_token_p50_s=percentile([x for s in samples if s.prompt_len == n for x in s.per_token_s], 0.5),
                prompt_eval_ms_p50=percentile([s.prompt_eval_ms for s in samples if s.prompt_len == n], 0.5),
            )
            for n in lengths
        },
        agreement_with_full_percent=pooled.percent if pooled.tokens else NAN,
        full_over_peer=ratio(full_p50_s, p50),
        split_over_peer=ratio(split_p50_s, p50),
    )


def raw(samples: Sequence[PeerSample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]


def p8(split_p50_s: float, peer: PeerSummary | None) -> tuple[float, str]:
    """P8's value (split decode over llama.cpp's) and its figure text: measured in this run when
    the peer ran, else the cited reference, said to be cited."""
    if peer is not None and peer["per_token_p50_s"] == peer["per_token_p50_s"]:
        ms = peer["per_token_p50_s"] * 1e3
        return (split_p50_s * 1e3 / ms,
                f"split decode ms/token / llama.cpp's {ms:.2f} (same GGUF, measured in this run)")
    return (split_p50_s * 1e3 / LLAMA_CPP_MS_PER_TOKEN,
            f"split decode ms/token / llama.cpp's {LLAMA_CPP_MS_PER_TOKEN} (issue 6, cited, not measured)")


def table_rows(peer: PeerSummary | None) -> list[tuple[str, str, str, str]]:
    """``(figure, llama.cpp, full / llama.cpp, split / llama.cpp)`` rows."""
    if not peer:
        return []

    def f(x: float, scale: float = 1.0, digits: int = 2) -> str:
        return "—" if x != x else f"{x * scale:.{digits}f}"

    rows = [
        ("per-token latency p50 (ms)", f(peer["per_token_p50_s"], 1e3), f(peer["full_over_peer"], 1, 3),
         f(peer["split_over_peer"], 1, 3)),
        ("per-token latency p95 (ms)", f(peer["per_token_p95_s"], 1e3), "—", "—"),
        ("llama.cpp's own decode counter (ms/token)", f(peer["llama_eval_ms_per_token"]), "—", "—"),
    ]
    rows += [(f"TTFT, {n}-token prompt (ms)", f(row["ttft_p50_s"], 1e3), "—", "—")
             for n, row in peer["by_prompt_length"].items()]
    rows.append(("greedy tokens agreeing with the full model", f"{f(peer['agreement_with_full_percent'], 1, 1)} %",
                 "—", "—"))
    return rows


def heading(peer: PeerSummary) -> str:
    return (f"llama.cpp (llama-cpp-python {peer['version']}) on the same GGUF, {peer['threads']} thread(s), "
            f"the same prompts and tokens, greedy, {peer['runs']} run(s)")


def text_lines(peer: PeerSummary | None, skipped: str | None) -> list[str]:
    """The peer's block under the bench's terminal table (or the line saying why it was skipped)."""
    if not peer:
        return [f"llama.cpp peer: not measured ({skipped})"] if skipped else []
    rows = table_rows(peer)
    w = max(len(r[0]) for r in rows)
    lines = ["", heading(peer) + ":", f"{'':{w}}  {'llama.cpp':>10}  {'full / it':>10}  {'split / it':>10}"]
    lines += [f"{a:{w}}  {b:>10}  {c:>10}  {d:>10}" for a, b, c, d in rows]
    return lines


def markdown_lines(peer: PeerSummary | None, skipped: str | None) -> list[str]:
    if not peer:
        return ["", f"llama.cpp (the peer) was not measured in this run: {skipped}. P8 uses the cited "
                f"{LLAMA_CPP_MS_PER_TOKEN} ms/token."] if skipped else []
    lines = ["", heading(peer) + ":", "", "| figure | llama.cpp | full / llama.cpp | split / llama.cpp |",
             "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table_rows(peer)]
    return lines


if __name__ == "__main__":
    import sys

    sys.exit(_child())
