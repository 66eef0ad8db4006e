"""Fixed data for snapshots and widget tests: a plan, a reply's timings, monitor samples and a
comparison, all made here so screenshots never change from run to run."""

from __future__ import annotations

from splitlm.shared.comparison import Comparison
from splitlm.shared.generation import GenerationResult
from splitlm.shared.monitor import GpuSample, MonitorSample
from splitlm.tui.app.comparison import CompareReport
from splitlm.tui.app.engine import PlanInfo, ReplyOutcome
from splitlm.tui.app.stats import ReplyStats
from splitlm.tui.app.turns import Message, TurnPlan

PLAN = PlanInfo(
    model="smollm2", family="llama", layers=30, split=(2, 28), fingerprint="b560f85c410b6407",
    address="unix:/run/user/1000/splitlm/trunk.sock", trunk_device="cpu", server_version="0.1.0",
    max_context=8192, local_device="cpu", local_dtype="float32",
)

REPLY = (
    "The sky looks blue because of **Rayleigh scattering**: air molecules scatter short "
    "wavelengths of sunlight much more than long ones.\n\n"
    "- blue light is scattered about 5× more than red\n"
    "- at sunset the light crosses more air, so the reds remain"
)

CONVERSATION = (
    Message("user", "Why is the sky blue?"),
    Message("assistant", REPLY, "eos"),
)


def _wave(i: int, base: float, amp: float) -> float:
    return base + amp * ((i * 7) % 11) / 10


DRAFT = "ngram"
"""The draft of the fixed reply (and of the snapshots' settings)."""


def result(tokens: int = 48) -> GenerationResult:
    """A reply of ``tokens`` tokens with a fixed, varied latency profile, drafted by prompt lookup
    (70% of 5 drafted tokens kept per round trip)."""
    steps = (tokens + 1) // 2
    own = [_wave(i, 0.011, 0.004) for i in range(tokens)]
    trunk = [_wave(i + 3, 0.024, 0.008) for i in range(tokens)]
    wire = [_wave(i + 5, 0.003, 0.004) for i in range(tokens)]
    lat = [o + t + w for o, t, w in zip(own, trunk, wire)]
    lat[0] += 0.12  # the prefill
    return GenerationResult(
        prompt_ids=list(range(20)), token_ids=list(range(100, 100 + tokens)), text=REPLY, finish_reason="eos",
        ttft_s=lat[0], per_token_s=lat[1:], client_compute_s=own, trunk_compute_s=trunk,
        bytes_sent=1185 * tokens, bytes_received=1185 * tokens,
        steps=steps, drafted=round((tokens - steps) / 0.7), accepted=tokens - steps,
    )


def outcome(tokens: int = 48) -> ReplyOutcome:
    r = result(tokens)
    return ReplyOutcome(r, TurnPlan(0, tuple(r.prompt_ids), tuple(r.prompt_ids)), ReplyStats.of(r), 2.0, DRAFT)


def sample(i: int, gpus: bool = False) -> MonitorSample:
    """The ``i``-th sample of a fixed minute: CPU and tokens/s rise and fall."""
    gpu = (
        GpuSample(0, "NVIDIA L4", _wave(i, 30, 60), int(9.5 * 2**30), 24 * 2**30, 61.0, 72.5),
    ) if gpus else ()
    return MonitorSample(
        time=1_700_000_000 + i, interval_s=1.0, cpu_percent=_wave(i, 20, 70), load_1m=1.52, load_5m=1.31,
        load_15m=0.97, mem_used_bytes=int(_wave(i, 5.0, 0.5) * 2**30), mem_total_bytes=int(23.4 * 2**30),
        daemon_rss_bytes=int(812.3 * 2**20), gpus=gpu,
        gpu_status="" if gpus else "no NVIDIA GPU: NVML Shared Library Not Found",
        sessions_open=2, steps_queued=i % 3, steps=int(_wave(i, 10, 30)), tokens_per_s=_wave(i, 10, 30),
        step_p50_ms=24.1, step_p95_ms=31.7, trunk_cache_bytes=39936 * 412,
    )


def report() -> CompareReport:
    full, split = result(40), result(40)
    full = GenerationResult(**{**full.__dict__, "ttft_s": 0.08, "per_token_s": [x * 0.6 for x in full.per_token_s],
                               "bytes_sent": 0, "bytes_received": 0})
    return CompareReport.of("Why is the sky blue?", Comparison(tuple(full.prompt_ids), full, split), DRAFT)
