"""``splitlm bench --load N,...``: the trunk daemon under N concurrent sessions, as an operator sees it.

Each session is a real trunk session over real gRPC (its own channel, as separate clients have),
driven by its own thread: a prompt prefill, a few unrecorded decode steps, then ``--load-steps``
one-position decode steps, each timed from send to reply. Nothing of the model runs here: the
hidden states are made once per session and replayed (already encoded), so the generator spends
its CPU on gRPC alone and the daemon is what is measured.

Why random hidden states, not ones recorded from the model's bottom: a trunk step's cost does not
depend on the values it is given (dense matmuls and attention over every cached position; no
data-dependent branch, no sparsity, no early exit), so any finite values of the right shape and
dtype time the same; unit-normal values keep far from float32's denormals (which would slow a
CPU) and from overflow. Recording them from the bottom would load the model in the generator,
whose memory and CPU then compete with the daemon on the same machine.

Why threads, not processes: a session's client work per step is a protobuf copy, a queue put and
a wait in gRPC's C core (which releases the GIL), ~0.1 ms; 32 processes would each import grpc
and torch (~0.3 GB each). The table shows the generator's own CPU next to the daemon's, so a
generator that became the bottleneck would show.

Rows: per mode (the bench starts one daemon without ``--batch`` and one with it, both up at once,
the order alternating per session count; or one row set for the daemon at ``--trunk``) and per
session count; with ``--load-prefill L``, each count again while one more session prefills L
positions over and over (rolling back to 0), so decode p95 shows what a long prefill does to the
other sessions.

Who calls: ``run.run`` (main thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...shared.errors import ExitCode, SplitlmError, UsageError
from ...shared.stats import percentile

if TYPE_CHECKING:
    from ...protos import trunk_pb2 as pb
    from ...shared.client import TrunkClient
    from ...shared.plan import Fingerprint
    from .options import BenchOptions

log = logging.getLogger(__name__)

WARMUP_STEPS = 3
"""Unrecorded decode steps per session before the common start (first-step costs: buffers grow)."""
REPLAYED = 8
"""Distinct decode hidden states per session, replayed in turn."""


@dataclass(frozen=True)
class LoadRow:
    """One run: ``sessions`` sessions stepping together against one daemon.

    Attributes:
        mode: ``solo`` (daemon without ``--batch``) or ``batch``.
        prefill_positions: the concurrent long prefill's length (0: none).
        positions_per_s: decode positions of all sessions / wall time of the recorded steps.
        step_p50_ms, step_p95_ms, step_max_ms: one decode step, send to reply, all sessions pooled.
        batches, batched_steps: what the daemon ran as batches meanwhile (its ``Info``).
        prefills, prefill_p50_ms: the long prefills completed meanwhile and their latency.
        client_cpu_s, daemon_cpu_s: CPU time of this process and of the daemon (None: not ours).
    """

    mode: str
    sessions: int
    prefill_positions: int
    steps_per_session: int
    wall_s: float
    positions_per_s: float
    step_p50_ms: float
    step_p95_ms: float
    step_max_ms: float
    batches: int
    batched_steps: int
    prefills: int
    prefill_p50_ms: float | None
    client_cpu_s: float
    daemon_cpu_s: float | None

    @property
    def mean_batch_rows(self) -> float | None:
        return self.batched_steps / self.batches if self.batches else None


@dataclass(frozen=True)
class Target:
    """A daemon to load: where, its plan as a fingerprint, and its process (when the bench owns it)."""

    mode: str
    address: str
    fingerprint: Fingerprint
    hidden_size: int
    dtype: Any  # torch.dtype
    max_context: int
    pid: int | None
    connect: Callable[[], TrunkClient]


def target_of(mode: str, client: TrunkClient, info: pb.InfoReply, pid: int | None,
              connect: Callable[[], TrunkClient]) -> Target:
    """What a session needs to open against the daemon that answered ``info``."""
    from ...shared import codec
    from ...shared.plan import Fingerprint

    p = info.plan
    fp = Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end, p.weights or "float32")
    if fp.digest != p.fingerprint:
        raise SplitlmError(f"the daemon at {client.address} reports a fingerprint ({p.fingerprint}) that its "
                           f"plan's digests do not make ({fp.digest}): a different splitlm version?")
    ctx = int(info.limits.max_context) or 1 << 30
    return Target(mode, client.address, fp, int(p.hidden_size), codec.TORCH_OF[p.dtype], ctx, pid, connect)


def _cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


def run_load(target: Target, sessions: int, prompt: int, steps: int, prefill: int, seed: int) -> LoadRow:
    """One run: ``sessions`` threads each open a session, prefill ``prompt`` positions, step
    ``WARMUP_STEPS`` unrecorded, wait for the others, then step ``steps`` recorded decode steps.
    With ``prefill`` > 0 one more session prefills that many positions again and again meanwhile.

    Raises:
        SplitlmError: a session failed (the first error, with its session number).
    """
    import torch

    from ...shared import codec
    from ...shared.client import TrunkStream

    need = max(prompt + WARMUP_STEPS + steps, prefill)
    if need > target.max_context:
        raise UsageError(f"--load-prompt/--load-steps/--load-prefill need {need} positions per session; the "
                         f"daemon allows {target.max_context}")
    parties = sessions + 1 + (prefill > 0)
    start = threading.Barrier(parties, timeout=600)
    stop = threading.Event()
    errors: list[tuple[int, BaseException]] = []
    spans: list[tuple[float, float]] = []
    latencies: list[float] = []
    prefill_ms: list[float] = []
    lock = threading.Lock()

    def hidden(gen: torch.Generator, t: int) -> pb.Tensor:
        h = torch.randn(1, t, target.hidden_size, generator=gen)  # (1, t, H)
        return codec.encode(h.to(target.dtype), target.dtype)

    def session(i: int) -> None:
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        prompt_msg = hidden(gen, prompt)
        decode = [hidden(gen, 1) for _ in range(REPLAYED)]
        client = target.connect()
        stream = None
        try:
            stream = TrunkStream(client, target.fingerprint, target.dtype)
            stream.step_tensor(prompt_msg, 0)
            pos = prompt
            for k in range(WARMUP_STEPS):
                stream.step_tensor(decode[k % REPLAYED], pos)
                pos += 1
            start.wait()
            own = []
            t0 = time.perf_counter()
            for k in range(steps):
                s0 = time.perf_counter()
                stream.step_tensor(decode[k % REPLAYED], pos)
                own.append(time.perf_counter() - s0)
                pos += 1
            t1 = time.perf_counter()
            with lock:
                spans.append((t0, t1))
                latencies.extend(own)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            with lock:
                errors.append((i, e))
            start.abort()
        finally:
            if stream is not None:
                stream.close()
            client.close()

    def prefiller() -> None:
        gen = torch.Generator().manual_seed(seed * 1000 + 999)
        msg = hidden(gen, prefill)
        client = target.connect()
        stream = None
        try:
            stream = TrunkStream(client, target.fingerprint, target.dtype)
            stream.step_tensor(msg, 0)
            start.wait()
            while not stop.is_set():
                s0 = time.perf_counter()
                stream.step_tensor(msg, 0)  # rolls back to 0 first
                with lock:
                    prefill_ms.append((time.perf_counter() - s0) * 1e3)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            with lock:
                errors.append((sessions, e))
            start.abort()
        finally:
            if stream is not None:
                stream.close()
            client.close()

    info_client = target.connect()
    try:
        before = info_client.info().batching
        threads = [threading.Thread(target=session, args=(i,), name=f"load-{i}") for i in range(sessions)]
        if prefill:
            threads.append(threading.Thread(target=prefiller, name="load-prefill"))
        for th in threads:
            th.start()
        try:
            start.wait()
        except threading.BrokenBarrierError:
            pass
        cpu0, dcpu0 = time.process_time(), _cpu_s(target.pid)
        for th in threads[:sessions]:
            th.join()
        stop.set()
        cpu1, dcpu1 = time.process_time(), _cpu_s(target.pid)
        for th in threads[sessions:]:
            th.join()
        after = info_client.info().batching
    finally:
        info_client.close()
    if errors:
        i, e = errors[0]
        raise SplitlmError(f"load session {i} of {sessions} failed: {e}") from e
    wall = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
    ms = [x * 1e3 for x in latencies]
    return LoadRow(
        mode=target.mode, sessions=sessions, prefill_positions=prefill, steps_per_session=steps,
        wall_s=wall, positions_per_s=sessions * steps / wall if wall > 0 else 0.0,
        step_p50_ms=percentile(ms, 0.50), step_p95_ms=percentile(ms, 0.95), step_max_ms=max(ms),
        batches=int(after.batches - before.batches), batched_steps=int(after.batched_steps - before.batched_steps),
        prefills=len(prefill_ms), prefill_p50_ms=percentile(prefill_ms, 0.50) if prefill_ms else None,
        client_cpu_s=cpu1 - cpu0,
        daemon_cpu_s=(dcpu1 - dcpu0) if dcpu0 is not None and dcpu1 is not None else None,
    )


def scaling(rows: list[LoadRow]) -> dict[str, float | None]:
    """Per row key ``mode/sessions/prefill``: aggregate positions/s over the same mode's one-session
    row without a prefill (None when that row is missing)."""
    base = {r.mode: r.positions_per_s for r in rows if r.sessions == 1 and not r.prefill_positions}
    return {key(r): (r.positions_per_s / base[r.mode] if base.get(r.mode) else None) for r in rows}


def key(r: LoadRow) -> str:
    return f"{r.mode}/{r.sessions}/{r.prefill_positions}"


def text_table(rows: list[LoadRow], title: str) -> str:
    """The table on stdout: one line per run."""
    scale = scaling(rows)
    head = (f"{'mode':<6} {'sessions':>8} {'prefill':>7} {'positions/s':>11} {'x one':>6} {'p50 ms':>7} "
            f"{'p95 ms':>7} {'max ms':>7} {'rows/batch':>10} {'prefills':>8} {'client CPU':>10} {'daemon CPU':>10}")
    lines = [title, head, "-" * len(head)]
    for r in rows:
        wall = r.wall_s or 1.0
        x = scale[key(r)]
        lines.append(
            f"{r.mode:<6} {r.sessions:>8} {r.prefill_positions or '-':>7} {r.positions_per_s:>11.1f} "
            f"{f'{x:.2f}' if x is not None else '-':>6} {r.step_p50_ms:>7.1f} {r.step_p95_ms:>7.1f} "
            f"{r.step_max_ms:>7.1f} {f'{r.mean_batch_rows:.1f}' if r.mean_batch_rows else '-':>10} "
            f"{r.prefills if r.prefill_positions else '-':>8} {r.client_cpu_s / wall:>9.0%} "
            f"{f'{r.daemon_cpu_s / wall:.0%}' if r.daemon_cpu_s is not None else '-':>10}"
        )
    for mode in dict.fromkeys(r.mode for r in rows):
        x8 = scale.get(f"{mode}/8/0")
        if x8 is not None:
            lines.append(f"P5 ({mode}): {x8:.2f}x aggregate positions/s at 8 sessions vs 1 (goal >= 4x)")
    return "\n".join(lines)


def run(args: argparse.Namespace, opts: BenchOptions, client_factory: Callable[[], TrunkClient]) -> int:
    """``splitlm bench --load``: start the daemons (or use ``--trunk``), run every row, print and
    write the results."""
    from ...shared.client import TrunkClient
    from ...shared.launcher import OwnedDaemon
    from .run import _finite, _loadavg, daemon_args

    assert opts.load is not None
    started = dt.datetime.now(dt.timezone.utc)
    load_start, t_start = _loadavg(), time.perf_counter()
    targets: list[Target] = []
    with ExitStack() as stack:
        if opts.trunk is not None:
            client = client_factory()
            stack.callback(client.close)
            info = client.info()
            mode = "batch" if info.batching.enabled else "solo"
            targets.append(target_of(mode, client, info, None, client_factory))
            daemons: list[OwnedDaemon] = []
        else:
            modes = (True,) if opts.batch else (False, True)
            daemons = []
            for batch in modes:
                d = OwnedDaemon(daemon_args(dataclasses.replace(opts, batch=batch), max(opts.load) + 1),
                                name=f"the bench's trunk daemon ({'--batch' if batch else 'no --batch'})")
                stack.callback(d.stop)
                print(f"splitlm bench: starting a trunk daemon ({opts.model or 'smollm2'}"
                      f"{', --batch' if batch else ''}) ...", file=sys.stderr, flush=True)
                info = d.start()
                daemons.append(d)
                address = d.address

                def connect(address: str = address) -> TrunkClient:
                    return TrunkClient(address, source="the bench's own daemon")

                c = connect()
                stack.callback(c.close)
                targets.append(target_of("batch" if batch else "solo", c, info, d.pid, connect))
        rows: list[LoadRow] = []
        prefills = (0, opts.load_prefill) if opts.load_prefill else (0,)
        for k, n in enumerate(opts.load):
            for t in targets if k % 2 == 0 else targets[::-1]:
                for prefill in prefills:
                    print(f"splitlm bench: {t.mode}, {n} session(s)"
                          f"{f', a {prefill}-position prefill alongside' if prefill else ''} ...",
                          file=sys.stderr, flush=True)
                    rows.append(run_load(t, n, opts.load_prompt, opts.load_steps, prefill, opts.seed))
    rows.sort(key=lambda r: (r.mode, r.prefill_positions, r.sessions))
    exits = {d.name: d.exit_code for d in daemons}
    bad = {k: v for k, v in exits.items() if v != 0}
    if bad:
        raise SplitlmError(f"{', '.join(bad)} exited with {', '.join(str(v) for v in bad.values())}")
    t0 = targets[0]
    meta: dict[str, Any] = {
        "command": "splitlm " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": time.perf_counter() - t_start,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()},
        "plan": {"split": [t0.fingerprint.start, t0.fingerprint.end], "fingerprint": t0.fingerprint.digest,
                 "weights": t0.fingerprint.precision, "dtype": str(t0.dtype).removeprefix("torch."),
                 "hidden_size": t0.hidden_size},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": _loadavg()},
        "daemon_exit_codes": list(exits.values()) or None,
    }
    title = (f"splitlm bench --load: split {t0.fingerprint.start}:{t0.fingerprint.end}, {t0.fingerprint.precision}, "
             f"{opts.load_prompt}-position prompt, {opts.load_steps} decode steps per session, load average "
             f"{meta['machine']['loadavg_start']} -> {meta['machine']['loadavg_end']}")
    print(text_table(rows, title))
    if opts.json_path is not None:
        scale = scaling(rows)
        doc = {"meta": meta,
               "load": [{**dataclasses.asdict(r), "mean_batch_rows": r.mean_batch_rows, "scaling_vs_one": scale[key(r)]}
                        for r in rows]}
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(_finite(doc), indent=1) + "\n")
    return ExitCode.OK
