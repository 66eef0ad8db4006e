"""``splitlm bench``: wiring. Options in, daemon up, model loaded, runs measured, results out.

Who calls: ``splitlm.tui.cli`` (one function, ``run``), on the main thread.
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
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...shared.errors import ExitCode, ModelNotFound, SplitlmError, UsageError
from .options import MAX_LENGTH, BenchOptions
from .summary import Memory, Summary

if TYPE_CHECKING:
    from collections.abc import Callable

    from ...protos import trunk_pb2 as pb
    from ...shared.client import TrunkClient
    from ...shared.launcher import OwnedDaemon
    from ...shared.prepare import SplitParts

log = logging.getLogger(__name__)

CONCURRENCY_PROMPT = 16
"""Prompt length of the concurrency runs (the shortest measured one when 16 is not)."""


def check_options(opts: BenchOptions) -> None:
    """Refuse what this build cannot measure, before anything loads.

    Raises:
        UsageError: with the reason.
    """
    for flag, given in (("--daemon-threads", opts.daemon_threads is not None), ("--batch", opts.batch)):
        if opts.trunk is not None and given:
            raise UsageError(f"{flag} sets the daemon the bench starts; the daemon at --trunk keeps "
                             "its own settings (leave out one of them)")
    if opts.load is not None:
        for flag, given in (("--plots", opts.plots is not None), ("--markdown", opts.markdown is not None),
                            ("--chat-json", opts.chat_json is not None), ("--link-rtt/--drafts", opts.link)):
            if given:
                raise UsageError(f"{flag} belongs to the other bench rows; --load measures the daemon alone "
                                 "(its table on stdout, --json for the figures)")
    if opts.plots is not None:
        from .plots import check_available

        check_available()
    if opts.markdown is not None and opts.markdown.is_file():
        from .link import BEGIN, END
        from .precisions import BEGIN as SWEEP_BEGIN
        from .precisions import END as SWEEP_END
        from .report import BEGIN as TABLES_BEGIN
        from .report import END as TABLES_END
        from .report import splice

        markers = (BEGIN, END) if opts.link else (SWEEP_BEGIN, SWEEP_END) if opts.precisions else (TABLES_BEGIN, TABLES_END)
        try:
            splice(opts.markdown.read_text(), "", *markers)
        except ValueError as e:
            raise UsageError(f"--markdown {opts.markdown}: {e}; refusing to overwrite it") from None
    if opts.chat_json is not None and not opts.chat_json.is_file():
        raise UsageError(f"--chat-json {opts.chat_json}: no such file")
    if opts.link:
        if opts.trunk is not None and "," in opts.trunk:
            raise UsageError("--link puts a relay in front of one daemon; with several --trunk addresses "
                             "measure the hops with scripts/bench_hops.py")
        for flag, given in (("--plots", opts.plots is not None), ("--chat-json", opts.chat_json is not None)):
            if given:
                raise UsageError(f"{flag} belongs to the full/split tables; the link rows (--link-rtt, "
                                 "--drafts, --draft, --prompt-kinds, --prompts) do not draw or read it")
    elif opts.link_bandwidth is not None:
        raise UsageError("--link-bandwidth caps the relay of --link-rtt: give --link-rtt too")
    from .precisions import check as check_sweep
    from .speed import check_peer

    check_peer(opts)
    check_sweep(opts)


def daemon_args(opts: BenchOptions, max_sessions: int) -> list[str]:
    """``splitlm-trunkd`` arguments that mirror the bench's settings."""
    out = ["--model", opts.model or "smollm2", "--log-level", "WARNING",
           "--max-sessions", str(max(64, max_sessions)), "--idle-timeout", "0"]
    if opts.split is not None:
        out += ["--split", f"{opts.split[0]}:{opts.split[1]}"]
    if opts.dtype is not None:
        out += ["--dtype", opts.dtype]
    if opts.daemon_threads is not None:
        out += ["--threads", str(opts.daemon_threads)]
    if opts.weights is not None:
        out += ["--weights", opts.weights, "--group-size", str(opts.group_size)]
    if opts.batch:
        out.append("--batch")
    return out


def _progress(total: int) -> tuple[Callable[[str], None], Callable[[], None]]:
    """A tick function and a closer: a tqdm bar on stderr when it is a terminal, else log lines."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, leave=False)
        first = [True]

        def tick(label: str) -> None:
            if not first[0]:
                bar.update(1)
            first[0] = False
            bar.set_description(label)

        return tick, bar.close

    def quiet(label: str) -> None:
        log.info("bench: %s", label)

    return quiet, lambda: None


def _load_model(spec: str) -> tuple[Any, Any]:
    """The model and its tokenizer; None for a weights-only directory (prompts are then fixed id
    sequences and no text is made, which times the same for full and split)."""
    from ...shared import prepare
    from ...shared.models import family_for, resolve
    from .prompts import NoText

    source = resolve(spec)
    try:
        tokenizer = source.load_tokenizer()
    except ModelNotFound:
        log.info("%s ships no tokenizer: prompts are fixed id sequences", source.model_id)
        tokenizer = None
    # NoText stands in for a tokenizer (decode only: the bench times ids, never text)
    text = tokenizer or NoText()
    model = prepare.LoadedModel(source, family_for(source.config), text, source.generation_eos())  # type: ignore[arg-type]
    return model, tokenizer


def _prompts(
    opts: BenchOptions, tokenizer: Any, vocab: int, context: int, warn: bool = True
) -> dict[int, list[int]]:
    from .prompts import prompt_of_length

    longest = context - opts.new_tokens
    lengths = sorted({longest if n == MAX_LENGTH else n for n in opts.prompt_lengths})
    fits = [n for n in lengths if 0 < n <= longest]
    dropped = [n for n in lengths if n not in fits]
    if dropped and warn:
        log.warning("prompt lengths %s + %d new tokens exceed the context of %d: dropped",
                    dropped, opts.new_tokens, context)
    if not fits:
        raise UsageError(
            f"--prompt-lengths: none fits the context of {context} tokens with --new-tokens "
            f"{opts.new_tokens} (each must be <= {context - opts.new_tokens})"
        )
    return {n: prompt_of_length(tokenizer, vocab, n) for n in fits}


def _context(model: Any, info: pb.InfoReply | None) -> int:
    """Positions a session may use: the model's, capped by the daemon's ``--max-context``."""
    ctx = int(getattr(model.source.config, "max_position_embeddings", 0) or 1 << 30)
    return min(ctx, int(info.limits.max_context or 1 << 30)) if info is not None else ctx


def _daemon_rss(client: TrunkClient) -> int | None:
    """The daemon's own resident memory, from one sample of its monitor stream."""
    stream = client.monitor(0.25)
    try:
        for sample in stream:
            return int(sample.daemon_rss_bytes)
    finally:
        stream.cancel()
    return None


def _check_split(opts: BenchOptions, info: pb.InfoReply) -> None:
    got = (info.plan.trunk_start, info.plan.trunk_end)
    if opts.split is not None and got != opts.split:
        raise UsageError(f"--split {opts.split[0]}:{opts.split[1]}: the daemon at {opts.trunk} serves "
                         f"layers {got[0]}:{got[1]}")


def _loadavg() -> float | None:
    """The 1-minute load average (None where the OS has none): how busy the machine was."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _finite(x: Any) -> Any:
    """NaN (a figure not measured) as JSON null, so the file is strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def command_meta(opts: BenchOptions, started: Any, t_start: float, prompts: Any) -> dict[str, Any]:
    """The head of a run's ``meta``: the command line, when it started and took, every option and
    the prompt lengths measured."""
    return {
        "command": "splitlm " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": time.perf_counter() - t_start,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()},
        "prompt_lengths": sorted(prompts),
    }


def _one_precision(weights: str | None, group_size: int, info: pb.InfoReply, device: Any) -> None:
    """The bench compares the split with the full model at one precision on both sides: a client
    precision other than the daemon's (which ``generate`` and ``compare`` accept) is refused here.

    Raises:
        UsageError: ``--weights`` names another precision than the daemon's.
    """
    from ...shared import prepare

    theirs = info.plan.weights or "float32"
    if weights is not None and prepare.precision_of(weights, device, group_size).tag != theirs:
        raise UsageError(
            f"the daemon runs --weights {theirs}: the bench runs both sides at one precision, so "
            f"leave --weights unset or pass {theirs} (compare runs mixed precisions)"
        )


def _connect(
    opts: BenchOptions, stack: ExitStack, client_factory: Callable[[], TrunkClient], check_lengths: bool = True
) -> tuple[OwnedDaemon | None, TrunkClient, pb.InfoReply, Any, Any, str]:
    """The daemon to measure, with a client and its ``Info``, and the model loaded here:
    ``(daemon the bench owns or None, client, info, model, tokenizer, model spec)``. Both are
    closed or stopped by ``stack``.

    Raises:
        UsageError: bad prompt lengths (before a daemon starts), or ``--split`` differs from the
            daemon's at ``--trunk``.
        DaemonStartError: the bench's own daemon did not start.
    """
    from ...shared import prepare
    from ...shared.client import TrunkClient
    from ...shared.launcher import OwnedDaemon

    if opts.trunk is None:
        # the model's config and tokenizer first (no weights): bad prompt lengths are refused
        # before a daemon loads anything
        model_spec = opts.model or "smollm2"
        model, tokenizer = _load_model(model_spec)
        if check_lengths:
            _prompts(opts, tokenizer, int(model.source.config.vocab_size), _context(model, None), warn=False)
        # a private socket; a non-zero exit at the end fails the run: a benchmark against a
        # daemon that crashed on the way out proves nothing about the figures before
        daemon = OwnedDaemon(daemon_args(opts, max(opts.concurrency)), name="the bench's trunk daemon")
        stack.callback(daemon.stop)
        print(f"splitlm bench: starting a trunk daemon ({model_spec}) ...", file=sys.stderr, flush=True)
        info = daemon.start()
        client = TrunkClient(daemon.address, source="the bench's own daemon")
        stack.callback(client.close)  # closed before the daemon stops (callbacks run last-first)
        return daemon, client, info, model, tokenizer, model_spec
    client = client_factory()
    stack.callback(client.close)
    info = client.info()
    _check_split(opts, info)
    model_spec = opts.model or prepare.client_model_spec(None, info)
    model, tokenizer = _load_model(model_spec)
    return None, client, info, model, tokenizer, model_spec


def _memory(
    opts: BenchOptions, model_spec: str, parts: SplitParts, client: TrunkClient, tick: Callable[[str], None]
) -> Memory:
    """Resident memory: the daemon's (its monitor), and with ``--memory`` the full model's and the
    client parts' in fresh child processes, next to a bare interpreter's."""
    from .memory import MemoryRequest
    from .memory import measure as measure_memory

    memory = Memory(daemon_rss_bytes=_daemon_rss(client))
    if opts.memory:
        req = MemoryRequest(model_spec, (parts.plan.start, parts.plan.end), parts.fingerprint.precision,
                            opts.threads)
        for part in ("full", "client"):
            tick(f"memory: {part}")
            m = measure_memory(part, req)
            if part == "full":
                memory["full_rss_bytes"] = m["rss_bytes"]
            else:
                memory["client_rss_bytes"] = m["rss_bytes"]
            memory["baseline_rss_bytes"] = m["baseline_rss_bytes"]
    return memory


def _write_outputs(
    opts: BenchOptions, summary: Summary, meta: dict[str, Any], raw: dict[str, Any], title: str
) -> None:
    """``--plots``, ``--json`` and ``--markdown``, each when asked for."""
    from . import report

    plot_files: dict[str, str] = {}
    if opts.plots is not None:
        from .plots import write

        files = write(summary, opts.plots, title)
        base = opts.markdown.parent if opts.markdown else Path.cwd()
        plot_files = {k: os.path.relpath(v, base) for k, v in files.items()}
    if opts.json_path is not None:
        doc = {"meta": meta, "summary": summary, "samples": raw, "plots": plot_files}
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(_finite(doc), indent=1, default=str) + "\n")
    if opts.markdown is not None:
        existing = opts.markdown.read_text() if opts.markdown.is_file() else None
        opts.markdown.parent.mkdir(parents=True, exist_ok=True)
        opts.markdown.write_text(report.splice(existing, report.markdown(summary, meta, plot_files)))


def run(args: argparse.Namespace, client_factory: Callable[[], TrunkClient]) -> int:
    """The whole bench; returns the exit code.

    Args:
        args: the parsed ``splitlm bench`` namespace (client config applied).
        client_factory: the CLI's client for ``--trunk`` (its token and TLS settings).
    """
    loaded = args.client_config
    # several --trunk addresses: a route (shared.route); the bench names them comma-separated
    trunk = ",".join(args.trunk) if loaded.source("trunk") == "--trunk" else None
    opts = BenchOptions.from_args(args, trunk, draft=loaded.settings.draft,
                                  draft_given=loaded.source("draft") == "--draft")
    check_options(opts)
    if opts.load is not None and opts.trunk is not None and len(args.trunk) > 1:
        raise UsageError("--load drives one daemon's sessions directly; give one --trunk address")
    if opts.load is not None:
        from .load import run as run_load

        return run_load(args, opts, client_factory)
    if opts.link:
        if opts.trunk is not None and "," in opts.trunk:
            raise UsageError("--link puts a relay in front of one daemon; with several --trunk addresses "
                             "measure the hops with scripts/bench_hops.py")
        if loaded.settings.tls_ca is not None and opts.trunk is not None and any(opts.link_rtts or ()):
            raise UsageError("--link-rtt with --tls-ca: the relay listens on this machine, so the "
                             "daemon's certificate would not name it; measure a plain loopback or "
                             "unix-socket daemon")
        return _run_link(args, opts, client_factory)
    if opts.precisions:
        from .precisions import run_precisions

        return run_precisions(args, opts, client_factory)
    started, load_start, t_start = _begin(opts)

    import torch

    from ...shared import prepare
    from ...shared.models import Part, resolve_device
    from ...shared.models.precision import client_weights
    from . import measure, report, speed

    with ExitStack() as stack:
        daemon, client, info, model, tokenizer, model_spec = _connect(opts, stack, client_factory)
        speed.check_peer_model(opts, model.source)
        device = resolve_device(getattr(args, "device", None) or "auto")
        weights = client_weights(opts.weights, opts.dtype)
        _one_precision(weights, opts.group_size, info, device)
        parts = prepare.split_parts(model, info, device, with_full=True, weights=weights, group_size=opts.group_size)
        assert isinstance(parts.full, Part)  # one precision on both sides: the full model is one Part
        wire_dtype = getattr(torch, opts.wire_dtype) if opts.wire_dtype else None
        vocab = int(model.source.config.vocab_size)
        setup = measure.Setup(model, model.tokenizer, parts.full, parts, client, wire_dtype, vocab)
        prompts = _prompts(opts, tokenizer, vocab, _context(model, info))
        conc_len = CONCURRENCY_PROMPT if CONCURRENCY_PROMPT in prompts else min(prompts)
        schedule = measure.single_schedule(sorted(prompts), opts.warmup, opts.repeats)
        tick, close_bar = _progress(len(schedule) * 3 // 2 + 2 * len(opts.concurrency) + 2 * opts.memory)
        stack.callback(close_bar)
        floor_in = speed.floor_inputs(parts.full, parts.plan.start, parts.plan.end)
        samples = measure.run_single(setup, prompts, opts.new_tokens, opts.warmup, opts.repeats, tick)
        conc = measure.run_concurrency(setup, opts.concurrency, prompts[conc_len], opts.new_tokens, tick)
        memory = _memory(opts, model_spec, parts, client, tick)
        client_threads = torch.get_num_threads()
        peer_run = speed.peer_runs(opts, model.source, prompts, client_threads, tick)
        close_bar()
        after = client.info().batching  # what the daemon batched during the runs
        batching = {"enabled": bool(after.enabled), "batches": int(after.batches),
                    "batched_steps": int(after.batched_steps)}
    daemon_exit = daemon.exit_code if daemon is not None else None
    if daemon is not None and daemon_exit != 0:
        raise SplitlmError(f"the bench's trunk daemon exited with {daemon_exit}:\n{daemon.final_log}")

    chat = None
    if opts.chat_json is not None:
        try:
            chat = report.read_chat(opts.chat_json)
        except ValueError as e:
            raise UsageError(f"--chat-json: {e}") from None
    wire_torch = wire_dtype or parts.trunk_dtype
    hidden = int(model.source.config.hidden_size)
    floor_summary, peer_summary = speed.summaries(floor_in, peer_run, samples, model.source)
    summary = report.summarise(samples, conc, hidden, torch.empty((), dtype=wire_torch).element_size(), memory, chat,
                               floor_summary, peer_summary, peer_run.skipped)
    meta: dict[str, Any] = {
        **command_meta(opts, started, t_start, prompts),
        "concurrency_prompt_length": conc_len,
        "plan": {
            "model": model.source.model_id, "layers": model.num_layers, "hidden_size": hidden,
            "split": [parts.plan.start, parts.plan.end], "fingerprint": parts.fingerprint.digest,
            "dtype": str(parts.trunk_dtype).removeprefix("torch."), "weights": parts.fingerprint.precision,
            "wire_dtype": str(wire_torch).removeprefix("torch."), "batching": batching["enabled"],
        },
        "threads": {"client": client_threads,
                    "daemon": opts.daemon_threads if opts.trunk is None and opts.daemon_threads else "default"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_start": load_start, "loadavg_end": _loadavg()},
        "daemon_batching": batching,
        "daemon_exit_code": daemon_exit,
    }
    title = f"{model.source.model_id} split {parts.plan.start}:{parts.plan.end}"
    print(report.text_table(summary, f"splitlm bench: {title}, {meta['plan']['weights']} weights, "
                            f"{opts.repeats} round(s), {opts.new_tokens} tokens per run, load average "
                            f"{report.load_text(meta['machine'])}"))
    raw = report.raw_samples(samples, conc)
    if peer_run.samples:
        from .peer import raw as peer_raw

        raw["peer"] = peer_raw(peer_run.samples)
    _write_outputs(opts, summary, meta, raw, title)
    return ExitCode.OK


def _begin(opts: BenchOptions) -> tuple[dt.datetime, float | None, float]:
    """Start a bench run: its wall-clock start, load average and timer; torch's threads and seed
    and transformers' quiet logging, as every mode wants them."""
    started = dt.datetime.now(dt.timezone.utc)
    load_start = _loadavg()
    t_start = time.perf_counter()

    import torch
    from transformers.utils import logging as hf_logging

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return started, load_start, t_start


def _run_link(args: argparse.Namespace, opts: BenchOptions, client_factory: Callable[[], TrunkClient]) -> int:
    """The link rows (``link``): drafts across link RTTs on three kinds of prompt."""
    started, load_start, t_start = _begin(opts)

    import torch

    from ...shared import prepare
    from ...shared.client import TrunkClient
    from ...shared.models import resolve_device
    from ...shared.models.precision import client_weights
    from . import link
    from .prompts import kind_prompt_ids, kind_prompts
    loaded = args.client_config
    rtts = opts.link_rtts or (0.0,)

    with ExitStack() as stack:
        daemon, client, info, model, tokenizer, model_spec = _connect(opts, stack, client_factory, check_lengths=False)
        device = resolve_device(getattr(args, "device", None) or "auto")
        parts = prepare.split_parts(model, info, device, weights=client_weights(opts.weights, opts.dtype),
                                    group_size=opts.group_size)
        wire_dtype = getattr(torch, opts.wire_dtype) if opts.wire_dtype else None
        vocab = int(model.source.config.vocab_size)
        setup = link.LinkSetup(model, model.tokenizer, parts, client, wire_dtype)
        chosen = kind_prompts(opts.prompt_kinds, opts.prompts_per_kind)
        room = _context(model, info) - opts.new_tokens
        if room < 8:
            raise UsageError(f"--new-tokens {opts.new_tokens}: the context of {_context(model, info)} positions "
                             "leaves no room for a link prompt")
        prompts = [(p, kind_prompt_ids(p, tokenizer, vocab)) for p in chosen]
        if any(len(ids) > room for _, ids in prompts):
            log.warning("link prompts cut to %d tokens: the context holds %d with --new-tokens %d",
                        room, _context(model, info), opts.new_tokens)
            prompts = [(p, ids[:room]) for p, ids in prompts]
        drafters = link.build_drafters(setup, opts.drafts, device)
        for d in drafters.values():
            if d is not None:
                stack.callback(d.close)

        def client_at(address: str) -> TrunkClient:
            if daemon is not None:
                return TrunkClient(address, source="the bench's relay")
            return TrunkClient.from_settings(loaded.settings, source="the bench's relay", address=address)

        total = link.total_runs(len(prompts), len(drafters), len(rtts), opts.warmup, opts.repeats)
        tick, close_bar = _progress(total)
        stack.callback(close_bar)
        samples = link.run_link(setup, prompts, rtts, opts.link_bandwidth, drafters, opts.new_tokens,
                                opts.warmup, opts.repeats, opts.draft_max, client_at, tick)
        close_bar()
        client_threads = torch.get_num_threads()
    daemon_exit = daemon.exit_code if daemon is not None else None
    if daemon is not None and daemon_exit != 0:
        raise SplitlmError(f"the bench's trunk daemon exited with {daemon_exit}:\n{daemon.final_log}")
    summary = link.summarise(samples)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "loadavg_start": load_start, "loadavg_end": _loadavg()}
    from .report import load_text

    meta: dict[str, Any] = {
        "command": "splitlm " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": time.perf_counter() - t_start,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()},
        "prompts": [{"kind": p.kind, "name": p.name, "tokens": len(ids)} for p, ids in prompts],
        "plan": {"model": model.source.model_id, "layers": model.num_layers,
                 "split": [parts.plan.start, parts.plan.end], "weights": parts.fingerprint.precision},
        "threads": {"client": client_threads,
                    "daemon": opts.daemon_threads if opts.trunk is None and opts.daemon_threads else "default"},
        "machine": machine,
        "loadavg": load_text(machine),
        "daemon_exit_code": daemon_exit,
    }
    title = f"{model.source.model_id} split {parts.plan.start}:{parts.plan.end}"
    print(link.text_table(summary, f"splitlm bench: {title}, across a link, up to {opts.new_tokens} tokens per "
                          f"run, {opts.repeats} round(s), load average {meta['loadavg']}"))
    if opts.json_path is not None:
        doc = {"meta": meta, "summary": summary, "samples": {"link": link.raw(samples)}}
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(_finite(doc), indent=1, default=str) + "\n")
    if opts.markdown is not None:
        from .report import splice

        existing = opts.markdown.read_text() if opts.markdown.is_file() else None
        opts.markdown.parent.mkdir(parents=True, exist_ok=True)
        opts.markdown.write_text(splice(existing, link.markdown(summary, meta), link.BEGIN, link.END))
    return ExitCode.OK
