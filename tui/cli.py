"""``splitlm``: the client. ``generate``, ``compare``, ``info`` and ``monitor`` run headless on
the shared engine; ``chat`` opens the Textual app (issue: the chat client); ``bench`` and
``distill`` are their own subpackages.

Cheap flags are answered before torch or transformers are imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..shared.errors import ExitCode, SplitlmError, UsageError

if TYPE_CHECKING:
    from ..shared.comparison import Comparison
    from ..shared.generation import GenerationResult, GenerationSettings

log = logging.getLogger("splitlm.client")


def build_parser() -> argparse.ArgumentParser:
    """The ``splitlm`` parser: each subcommand's flags come from the registry (``shared.config``)
    and a few of its own."""
    from ..shared.config import SPLITLM, add_flags

    p = argparse.ArgumentParser(
        prog="splitlm",
        description="Split inference client: the bottom and top of the model run here, the trunk in a "
        "splitlm-trunkd daemon; hidden states (not text, not logits) cross the wire.",
        epilog="Each setting KEY can also come from the environment (SPLITLM_KEY) or the client's TOML "
        "config file (key = value); flags win over the environment, the environment over the file. "
        "`splitlm COMMAND --help` lists a command's flags.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    add_flags(p, SPLITLM)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    g = sub.add_parser(
        "generate", help="generate a reply (split through the daemon, or --full locally)",
        epilog="With --batch FILE: one JSON object a line in (prompt or messages, and optionally id, "
        "max_new_tokens, temperature, top_p, top_k, seed, stop, no_chat; the flags are the defaults), "
        "one JSON result a line out, in input order; a bad line gets "
        '{"line": N, "id": ..., "error": ...} and the others still run. Exit status: 0 when every '
        "line ran, 1 when some failed, 2 for a usage "
        "error (no such file, an empty file, a bad flag).",
    )
    g.add_argument("--full", action="store_true", help="run the whole model here; no daemon needed")
    add_flags(g, "generate")
    g.add_argument("prompt", nargs="?", help="the prompt; - reads standard input (none with --batch)")
    c = sub.add_parser("compare", help="the same prompt full and split in one run: agreement and ratios")
    add_flags(c, "compare")
    c.add_argument("prompt", help="the prompt; - reads standard input")
    i = sub.add_parser("info", help="what the daemon serves")
    add_flags(i, "info")
    m = sub.add_parser("monitor", help="the daemon's CPU, memory, GPUs and trunk load, one sample per interval")
    m.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between samples, 0.25-10 (default 1)")
    add_flags(m, "monitor")
    b = sub.add_parser("bench", help="full model and split side by side: TTFT, latency, wire bytes, memory, "
                       "concurrency, the issue-6 goals")
    from .bench.options import add_arguments as add_bench_arguments  # argparse only, no torch

    add_bench_arguments(b)
    r = sub.add_parser("relay", help="forward connections to the daemon with a set delay (a slow link to try "
                       "a remote daemon's speed on a local one)")
    add_flags(r, "relay")
    d = sub.add_parser("distill", help="train a draft (a student) from the model's own weights, here; "
                       "use it with --draft student:DIR")
    add_flags(d, "distill")
    pl = sub.add_parser("plan", help="where to cut a model into stages (bottom, trunk stages or devices, top), "
                        "from its config alone: layers, bytes, KV per position, FLOPs per token")
    add_flags(pl, "plan")

    sv = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP endpoint (chat and text completions) on the split model",
        epilog="Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, "
        "GET /metrics. The sampling flags are the defaults of requests that leave a field out. "
        "Exit status 2 for a usage error (a non-loopback --listen without --api-key-file).",
    )
    add_flags(sv, "serve")
    ch = sub.add_parser("chat", help="the terminal chat app (what bare `splitlm` opens)")
    from .app.launch import add_chat_arguments  # no Textual import: the flags only

    add_chat_arguments(ch)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.version:
        from ..shared.version import __version__

        print(__version__)
        return ExitCode.OK
    if args.command is None:  # bare `splitlm` (global flags only) opens the chat app
        args = parser.parse_args([*(sys.argv[1:] if argv is None else argv), "chat"])
    try:
        _apply_config(args)
    except SplitlmError as e:
        print(f"splitlm: error: {e}", file=sys.stderr)
        return e.exit_code
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        handler = {"generate": cmd_generate, "compare": cmd_compare, "info": cmd_info, "monitor": cmd_monitor,
                   "chat": cmd_chat, "bench": cmd_bench, "relay": cmd_relay,
                   "distill": cmd_distill, "plan": cmd_plan, "serve": cmd_serve}[args.command]
        return handler(args)
    except SplitlmError as e:
        print(f"splitlm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("splitlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return ExitCode.FAILURE
    finally:
        # close channels before the interpreter exits: gRPC's threads must not be holding a
        # call when it is torn down (see TrunkStream.close)
        while _CLIENTS:
            _CLIENTS.pop().close()


def _apply_config(args: argparse.Namespace) -> None:
    """Layer flags > ``SPLITLM_*`` > client.toml > defaults (``shared.config``), and put the
    effective values back on ``args`` (``args.trunk``, ``args.model``, ...); the whole result,
    with sources, is ``args.client_config``.

    Raises:
        ConfigError: a bad value, naming the key, its source and what is allowed.
    """
    from ..shared import config

    loaded = config.load(
        config.ClientSettings, config.flags_from(args, config.ClientSettings),
        config=getattr(args, "config", None), file_name="client",
    )
    for key in (f.name for f in dataclasses.fields(loaded.settings)):  # those this command has a flag for
        if hasattr(args, key):
            setattr(args, key, getattr(loaded.settings, key))
    args.client_config = loaded
    if loaded.settings.threads:
        import torch

        torch.set_num_threads(loaded.settings.threads)


_CLIENTS: list[Any] = []
"""Trunk clients made by this command, closed when it returns."""


def _client(args: argparse.Namespace) -> Any:
    """The trunk of ``--trunk``: one daemon's ``TrunkClient``, or a ``RouteClient`` over several
    (``shared.route``), which every face uses the same way."""
    from ..shared import route

    loaded = args.client_config
    source = loaded.source("trunk")
    source = "the default socket" if source == "default" else source
    client = route.from_settings(loaded.settings, source=source)
    _CLIENTS.append(client)
    return client


def _one_trunk(args: argparse.Namespace, command: str) -> str:
    """The one ``--trunk`` address of a command that talks to one daemon (relay).

    Raises:
        UsageError: several were given.
    """
    if len(args.trunk) != 1:
        raise UsageError(
            f"splitlm {command} talks to one daemon; {len(args.trunk)} --trunk addresses were given "
            f"({', '.join(args.trunk)}): give one (splitlm info takes several and shows the route)"
        )
    return str(args.trunk[0])


def _settings(args: argparse.Namespace) -> GenerationSettings:
    from ..shared.generation import GenerationSettings
    from ..shared.sampling import SamplingSettings

    sampling = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    return GenerationSettings(max_new_tokens=args.max_new_tokens, stop=tuple(args.stop or ()), sampling=sampling)


def _reconnect_notice(event: Any) -> None:
    """Failover notices on stderr; the reply itself keeps streaming to stdout."""
    from ..shared.failover import Reconnecting

    if isinstance(event, Reconnecting):
        print(
            f"splitlm: lost the trunk daemon ({event.error}); reconnecting in {event.delay_s:.1f} s "
            f"(attempt {event.attempt}, {event.elapsed_s:.0f}/{event.deadline_s:.0f} s)",
            file=sys.stderr, flush=True,
        )
    else:
        print(
            f"splitlm: reconnected after {event.downtime_s:.1f} s; rebuilt the trunk cache "
            f"({event.replayed_positions} positions in {event.replayed_steps} steps, "
            f"{event.replay_s * 1e3:.0f} ms); continuing",
            file=sys.stderr, flush=True,
        )


def _prompt(args: argparse.Namespace) -> str:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():
        raise UsageError("the prompt is empty")
    return text


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _device_dtype(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..shared.models import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def _weights(args: argparse.Namespace) -> str | None:
    """``--weights``, else an explicit ``--dtype``, else None (the daemon's; float32 for --full)."""
    from ..shared.models.precision import client_weights

    return client_weights(args.weights, args.dtype)


def _precisions(args: argparse.Namespace) -> dict[str, Any]:
    """The precision options of ``prepare.split_parts`` (and ``full_pipeline``, with ``split``)."""
    return {"weights": _weights(args), "group_size": args.group_size, "trunk_weights": args.trunk_weights}


def _full_pipeline(args: argparse.Namespace, model: Any, device: Any, dtype: Any) -> Any:
    """``--full``: the whole model here, at ``--trunk-weights`` for ``--split``'s layers when given."""
    from ..shared import prepare

    return prepare.full_pipeline(model, dtype, device, split=getattr(args, "split", None), **_precisions(args))


def _wire_dtype(args: argparse.Namespace) -> Any:
    """``--wire-dtype`` as a torch dtype; None for exact (the trunk's dtype)."""
    if args.wire_dtype in (None, "exact"):
        return None
    from ..shared.codec import NAMES

    return NAMES[args.wire_dtype]


def _result_json(res: GenerationResult, plan: dict[str, Any]) -> dict[str, Any]:
    return {
        "text": res.text,
        "token_ids": res.token_ids,
        "prompt_token_ids": res.prompt_ids,
        "finish_reason": res.finish_reason,
        "plan": plan,
        "timings": {
            "ttft_s": res.ttft_s,
            "per_token_s": res.per_token_s,
            "client_compute_s": res.client_compute_s,
            "trunk_compute_s": res.trunk_compute_s,
        },
        "bytes_sent": res.bytes_sent,
        "bytes_received": res.bytes_received,
        "draft": _draft_json(res),
    }


def _draft_json(res: GenerationResult) -> dict[str, Any]:
    """Round trips and draft figures of one reply (``drafted`` is 0 without a draft)."""
    return {
        "steps": res.steps,
        "tokens_per_step": res.tokens_per_step,
        "drafted": res.drafted,
        "accepted": res.accepted,
        "acceptance": res.acceptance,
        "draft_s": res.draft_s,
    }


def _drafter(args: argparse.Namespace, model: Any, device: Any, parts: Any = None) -> Any:
    """The ``--draft`` drafter for one session (None for off); a new one per session."""
    from ..shared.draft.build import build_drafter

    return build_drafter(args.draft, model, device, bottom=getattr(parts, "bottom", None),
                         top=getattr(parts, "top", None))


def _run(
    pipeline: Any, model: Any, ids: list[int], settings: GenerationSettings, stream: bool,
    drafter: Any = None, draft_max: int = 8, draft_link: float | None = None,
) -> GenerationResult:
    from ..shared.generation import generate

    streamed: list[str] = []

    def on_token(ev: Any) -> None:
        if ev.delta:
            streamed.append(ev.delta)
            sys.stdout.write(ev.delta)
            sys.stdout.flush()

    res = generate(pipeline, model.tokenizer, ids, settings, model.eos_ids, on_token=on_token if stream else None,
                   drafter=drafter, draft_max=draft_max, draft_link=draft_link)
    if stream:
        sys.stdout.write(res.text[len("".join(streamed)) :] + "\n")
        sys.stdout.flush()
    return res


def cmd_generate(args: argparse.Namespace) -> int:
    from ..shared.failover import RetryPolicy

    if args.batch_file is not None:
        return _generate_batch(args)
    if args.output is not None:
        raise UsageError("--output goes with --batch FILE (one reply goes to standard output)")
    if args.prompt is None:
        raise UsageError("give a prompt (- reads standard input), or --batch FILE")
    settings = _settings(args)
    retry = RetryPolicy.from_settings(args.client_config.settings)
    prompt = _prompt(args)
    from ..shared import prepare
    from ..shared.generation import Pipeline, prompt_ids

    pipeline: Pipeline
    if args.full:
        _quiet_libraries()
        device, dtype = _device_dtype(args)
        model = prepare.load_model(args.model)
        pipeline = _full_pipeline(args, model, device, dtype)
        plan = prepare.plan_dict(model, None, None)
        drafter = _drafter(args, model, device)
    else:
        client = _client(args)
        info = client.info()
        _quiet_libraries()
        device = _device_dtype(args)[0]
        model = prepare.load_model(prepare.client_model_spec(args.model, info))
        parts = prepare.split_parts(model, info, device, **_precisions(args))
        pipeline = prepare.split_pipeline(
            parts, client, wire_dtype=_wire_dtype(args), retry=retry, on_reconnect=_reconnect_notice
        )
        plan = prepare.plan_dict(model, parts.plan.split, parts.fingerprint.digest)
        drafter = _drafter(args, model, device, parts)
    ids = prompt_ids(model.tokenizer, prompt, chat=not args.no_chat)
    try:
        res = _run(pipeline, model, ids, settings, stream=not args.json, drafter=drafter,
                   draft_max=args.draft_max, draft_link=args.draft_link)
    finally:
        pipeline.close()
        if drafter is not None:
            drafter.close()
    if args.json:
        print(json.dumps(_result_json(res, plan)))
    elif drafter is not None:
        rate = f"{res.acceptance:.0%}" if res.acceptance is not None else "none drafted"
        print(f"splitlm: draft {drafter.name}: {len(res.token_ids)} tokens in {res.steps} steps "
              f"({res.tokens_per_step:.2f} per round trip), {res.accepted}/{res.drafted} drafted "
              f"tokens accepted ({rate})", file=sys.stderr)
    return ExitCode.OK


def _generate_batch(args: argparse.Namespace) -> int:
    """``generate --batch FILE`` (``tui.batch``): the file and ``--output`` are checked before
    the model loads; the results file is written whole or not at all.

    Returns:
        0 when every line ran, 1 when some failed (each has its ``error``).
    """
    from . import batch

    if args.prompt is not None:
        raise UsageError(f"give a prompt or --batch {args.batch_file}, not both")
    settings = _settings(args)
    lines = batch.read_source(args.batch_file)
    output = batch.Output(args.output)
    lanes: list[batch.Lane] = []
    try:
        model, lanes, plan = _batch_lanes(args, len(lines))
        items = batch.prepare_items(lines, settings, not args.no_chat, model.tokenizer)
        summary = batch.run_batch(
            items, lanes, model.tokenizer, model.eos_ids, lambda res: _result_json(res, plan), output,
            batch.Progress(len(items)), draft_max=args.draft_max, draft_link=args.draft_link,
        )
        output.commit()
    finally:
        output.discard()
        for lane in lanes:
            if lane.drafter is not None:
                lane.drafter.close()
    print(f"splitlm: batch: {summary.lines} line{'s' if summary.lines != 1 else ''}, {summary.failed} failed, {summary.tokens} tokens in "
          f"{summary.seconds:.1f} s ({len(lanes)} at a time)", file=sys.stderr)
    return ExitCode.FAILURE if summary.failed else ExitCode.OK


def _batch_lanes(args: argparse.Namespace, lines: int) -> tuple[Any, list[Any], dict[str, Any]]:
    """The model, the batch's lanes (``--concurrency`` of them for the split, at most one per
    line; one for ``--full``) and the plan for the results.

    Split lanes share the client's parts under one lock (``shared.serialised``) and open a trunk
    session per prompt; each lane has its own drafter, run under the same lock.
    """
    from ..shared import prepare
    from ..shared.generation import LocalPipeline
    from .batch import Lane

    if args.full:
        _quiet_libraries()
        device, dtype = _device_dtype(args)
        model = prepare.load_model(args.model)
        full = _full_pipeline(args, model, device, dtype).part
        return model, [Lane(lambda: LocalPipeline(full), _drafter(args, model, device))], prepare.plan_dict(
            model, None, None
        )
    shared = _shared_split(args, _reconnect_notice)
    lanes = []
    # more sessions than the daemon holds would only fail lines with RESOURCE_EXHAUSTED
    for _ in range(max(1, min(args.concurrency, lines, shared.info.limits.max_sessions))):
        lanes.append(Lane(shared.open_pipeline, shared.drafter()))
    own = shared.own
    return shared.model, lanes, prepare.plan_dict(shared.model, own.plan.split, own.fingerprint.digest)


@dataclasses.dataclass
class _SharedSplit:
    """The client's parts shared under one lock by several trunk sessions at once (``generate
    --batch``'s lanes, ``serve``'s requests): each session is opened by ``open_pipeline`` on the
    thread that runs it, each drafter runs under the same lock.

    Attributes:
        own: the parts themselves (unserialised: for their plan and cache sizes).
        parts: the same parts behind the lock.
    """

    client: Any
    model: Any
    info: Any
    device: Any
    lock: Any
    own: Any
    parts: Any
    open_pipeline: Callable[[], Any]
    args: argparse.Namespace

    def drafter(self) -> Any:
        """A new drafter for one session (None without ``--draft``), serialised under the lock."""
        from ..shared.serialised import SerialisedDrafter

        d = _drafter(self.args, self.model, self.device, self.parts)
        return None if d is None else SerialisedDrafter(d, self.lock)


def _shared_split(args: argparse.Namespace, on_reconnect: Any) -> _SharedSplit:
    """Connect (one daemon or a route), load the client's parts for its plan, and share them
    under one lock (``shared.serialised``); sessions fail over by ``--retry-*``."""
    from ..shared import prepare
    from ..shared.failover import RetryPolicy
    from ..shared.serialised import Lock, serialised_parts

    retry = RetryPolicy.from_settings(args.client_config.settings)
    client = _client(args)
    info = client.info()
    _quiet_libraries()
    device = _device_dtype(args)[0]
    model = prepare.load_model(prepare.client_model_spec(args.model, info))
    lock = Lock()
    own = prepare.split_parts(model, info, device, **_precisions(args))
    parts = serialised_parts(own, lock)
    wire = _wire_dtype(args)

    def open_pipeline() -> Any:
        return prepare.split_pipeline(parts, client, wire_dtype=wire, retry=retry, on_reconnect=on_reconnect)

    return _SharedSplit(client, model, info, device, lock, own, parts, open_pipeline, args)


def _summary(res: GenerationResult) -> dict[str, float]:
    """One run's figures for ``compare --json``; percentiles are ``shared.stats``'s."""
    from ..shared.stats import ReplyStats

    st = ReplyStats.of(res)
    return {
        "tokens": st.tokens,
        "ttft_s": st.ttft_s,
        "per_token_p50_s": st.p50_s,
        "per_token_p95_s": st.p95_s,
        "tokens_per_s": st.tokens_per_s,
        "total_s": st.total_s,
        "bytes_per_token": st.bytes_per_token,
        "overhead_p50_s": st.overhead_p50_s,
    }


RATIO_KEYS = ("ttft_s", "per_token_p50_s", "per_token_p95_s", "tokens_per_s")
"""The figures ``compare`` divides, split over full."""


def _comparison_json(c: Comparison, plan: dict[str, Any]) -> dict[str, Any]:
    """``splitlm compare --json``'s object."""
    from ..shared.stats import ratio

    a = c.agreement
    sf, ss_ = _summary(c.full), _summary(c.split)
    return {
        "plan": plan,
        "prompt_tokens": len(c.prompt_ids),
        "agreement": {
            "identical": a.identical,
            "matching_prefix": a.matching_prefix,
            "first_divergence": a.first_difference,
            "full_tokens": a.full_tokens,
            "split_tokens": a.split_tokens,
        },
        "full": sf,
        "split": ss_,
        "ratios_split_over_full": {k: ratio(ss_[k], sf[k]) for k in RATIO_KEYS},
        "draft": {"full": _draft_json(c.full), "split": _draft_json(c.split)},
        "full_text": c.full.text,
        "split_text": c.split.text,
    }


def _print_comparison(out: dict[str, Any], title: str) -> None:
    """``splitlm compare``'s text: the plan, the agreement, a full/split table."""
    a, sf, ss_, ratios = out["agreement"], out["full"], out["split"], out["ratios_split_over_full"]
    print(title)
    verdict = "identical" if a["identical"] else f"first divergence at token {a['matching_prefix']}"
    print(f"tokens: full {a['full_tokens']}, split {a['split_tokens']}, {a['matching_prefix']} agree, {verdict}")
    rows = [
        ("TTFT (ms)", "ttft_s", 1e3),
        ("per-token p50 (ms)", "per_token_p50_s", 1e3),
        ("per-token p95 (ms)", "per_token_p95_s", 1e3),
        ("tokens/s", "tokens_per_s", 1),
    ]
    print(f"{'':22}{'full':>10}{'split':>10}{'split/full':>12}")
    for label, key, scale in rows:
        print(f"{label:22}{sf[key] * scale:10.2f}{ss_[key] * scale:10.2f}{ratios[key]:12.3f}")
    print(f"{'wire bytes/token':22}{'':>10}{ss_['bytes_per_token']:10.0f}")
    print(f"{'split overhead p50 (ms)':22}{'':>10}{ss_['overhead_p50_s'] * 1e3:10.3f}")
    df, ds = out["draft"]["full"], out["draft"]["split"]
    print(f"{'tokens per step':22}{df['tokens_per_step']:10.2f}{ds['tokens_per_step']:10.2f}")
    if ds["drafted"]:
        print(f"{'draft acceptance':22}{df['acceptance']:10.2f}{ds['acceptance']:10.2f}")


def cmd_compare(args: argparse.Namespace) -> int:
    """The same prompt full (here) and split (through the daemon), with ``shared.comparison``."""
    from ..shared.failover import RetryPolicy

    settings = _settings(args)
    retry = RetryPolicy.from_settings(args.client_config.settings)
    prompt = _prompt(args)
    from ..shared import prepare
    from ..shared.comparison import MODES, Mode, compare
    from ..shared.generation import LocalPipeline, prompt_ids

    client = _client(args)
    info = client.info()
    _quiet_libraries()
    device = _device_dtype(args)[0]
    model = prepare.load_model(prepare.client_model_spec(args.model, info))
    parts = prepare.split_parts(model, info, device, with_full=True, **_precisions(args))
    assert parts.full is not None
    full = LocalPipeline(parts.full)
    split = prepare.split_pipeline(parts, client, wire_dtype=_wire_dtype(args), retry=retry, on_reconnect=_reconnect_notice)
    ids = prompt_ids(model.tokenizer, prompt, chat=not args.no_chat)
    # one drafter per side: the same drafts, lengths and chunks, so greedy tokens compare exactly
    drafters: dict[Mode, Any] = {m: _drafter(args, model, device, parts) for m in MODES}
    try:
        result = compare(full, split, model.tokenizer, ids, settings, model.eos_ids, warmup=True,
                         drafters=drafters, draft_max=args.draft_max, draft_link=args.draft_link)
    finally:
        split.close()
        for d in drafters.values():
            if d is not None:
                d.close()
    out = _comparison_json(result, prepare.plan_dict(model, parts.plan.split, parts.fingerprint.digest))
    if args.json:
        print(json.dumps(out))
    else:
        _print_comparison(out, f"plan: {model.source.model_id}, {model.num_layers} layers, split {parts.plan}, "
                          f"prompt {len(ids)} tokens")
    return ExitCode.OK


def cmd_bench(args: argparse.Namespace) -> int:
    """``splitlm bench`` (``splitlm.tui.bench``): the table on stdout, progress on stderr."""
    from .bench.run import run

    return run(args, lambda: _client(args))


def cmd_relay(args: argparse.Namespace) -> int:
    """``splitlm relay`` (``shared.relay``): serve until interrupted (Ctrl-C or SIGTERM), then
    print what crossed."""
    import signal
    import threading

    from ..shared.relay import Relay

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    target = _one_trunk(args, "relay")
    relay = Relay(target, rtt_s=args.rtt, bandwidth=args.bandwidth, listen=args.relay_listen)
    try:
        relay.start()
    except OSError as e:
        raise UsageError(f"relay: cannot listen at {args.relay_listen or 'a new address'}: {e}") from None
    with relay:
        cap = "no bandwidth cap" if args.bandwidth is None else f"{args.bandwidth} bytes/s each way"
        print(f"splitlm relay: {relay.address} -> {target}, RTT {args.rtt * 1e3:g} ms, {cap}; "
              f"point the client at --trunk {relay.address} (Ctrl-C stops)", file=sys.stderr, flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    st = relay.stats
    print(f"splitlm relay: {st.connections} connection(s), {st.bytes_up} bytes up, {st.bytes_down} bytes down",
          file=sys.stderr)
    return ExitCode.OK


def cmd_distill(args: argparse.Namespace) -> int:
    """``splitlm distill`` (``splitlm.tui.distill``): the summary on stdout, progress on stderr."""
    from .distill.run import run

    _quiet_libraries()
    return run(args, lambda: _client(args))


def cmd_serve(args: argparse.Namespace) -> int:
    """``splitlm serve`` (``splitlm.tui.serve``): the exposure is checked first (exit 2 before
    anything loads), then the model is connected as ``generate --batch`` connects its lanes: the
    client's parts shared under one lock, one trunk session (and drafter) per request in flight.
    """
    from .serve.run import check_exposure, reconnect_log, serve
    from .serve.sessions import Kept

    exposure = check_exposure(args.serve_listen, args.api_key_file)
    shared = _shared_split(args, reconnect_log)

    def open_session() -> Kept:
        return Kept(shared.open_pipeline(), shared.drafter())

    return serve(args, exposure, shared.model, shared.own, shared.info, shared.client, open_session)


def cmd_chat(args: argparse.Namespace) -> int:
    """The Textual app (``splitlm.tui.app``); it logs to a file, never to the terminal it owns."""
    from .app.launch import run_chat

    source = args.client_config.source("trunk")
    return run_chat(args, lambda: _client(args), "the default socket" if source == "default" else source)


def cmd_plan(args: argparse.Namespace) -> int:
    """``splitlm plan`` (``shared.partition``): a table, or with ``--json`` one object; no
    weights load, no daemon is asked. A plan that does not fit is a usage error (exit 2)."""
    from ..shared.partition import partition_for, render

    _quiet_libraries()
    p = partition_for(
        args.model, args.strategy, args.stages, args.devices, args.client_memory, args.max_context,
        args.weights, args.group_size, args.layers,
    )
    print(json.dumps(p.to_dict()) if args.json else render(p))
    return ExitCode.OK


def cmd_info(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    client = _client(args)
    if len(args.trunk) > 1:
        return _info_route(args, client)
    info = client.info()
    d = MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    d["address"] = client.address
    if args.json:
        print(json.dumps(d))
        return ExitCode.OK
    p, lim = info.plan, info.limits
    print(f"daemon      {client.address} (splitlm-trunkd {info.server_version})")
    print(f"model       {p.model_id} ({p.family}/{p.model_type}, {p.num_layers} layers, hidden {p.hidden_size})")
    print(f"trunk       layers {p.trunk_start}:{p.trunk_end} on {p.device}, {d['plan']['dtype'].lower()}")
    for dl in p.placement:  # a trunk cut over several devices (splitlm-trunkd --devices)
        print(f"  device    {dl.device}: layers {dl.start}:{dl.end}")
    print(f"fingerprint {p.fingerprint}")
    print(f"limits      {lim.max_sessions} sessions, {lim.max_context} tokens each, {lim.max_message_bytes} B messages")
    print(f"sessions    {info.sessions_open} open")
    return ExitCode.OK


def _info_route(args: argparse.Namespace, client: Any) -> int:
    """``splitlm info`` with several ``--trunk``: each daemon's plan (or why it did not answer),
    then the route they make (or why they make none).

    Returns:
        0 when every daemon answered and they make a route; 1 when one did not answer; 2 when
        they make no route (gap, overlap, another model).
    """
    from google.protobuf.json_format import MessageToDict

    from ..shared import route as rt

    answers = rt.ask_each(client.clients)
    daemons: list[dict[str, Any]] = []
    for c, a in zip(client.clients, answers):
        if isinstance(a, SplitlmError):
            daemons.append({"address": c.address, "error": str(a).splitlines()[0]})
        else:
            d = MessageToDict(a, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            daemons.append({"address": c.address, **d})
    code, problem = ExitCode.OK, None
    route_out: dict[str, Any] | None = None
    failed = [a for a in answers if isinstance(a, SplitlmError)]
    if failed:
        code, problem = ExitCode.FAILURE, "no route: not every daemon answered"
    else:
        try:
            replies = [a for a in answers if not isinstance(a, SplitlmError)]
            route = rt.build_route([(c.address, a) for c, a in zip(client.clients, replies)])
        except rt.RouteError as e:
            code, problem = ExitCode.USAGE, f"no route: {e}"
        else:
            route_out = {
                "layers": [route.start, route.end],
                "fingerprint": route.fingerprint().digest,
                "stages": [{"layers": [s.start, s.end], "addresses": list(s.addresses),
                            "fingerprint": route.fingerprint(s.start, s.end).digest} for s in route.stages],
            }
    if args.json:
        print(json.dumps({"daemons": daemons, "route": route_out, "error": problem}))
        return code
    for d in daemons:
        if "error" in d:
            print(f"daemon      {d['address']}: {d['error']}")
            continue
        p = d["plan"]
        print(f"daemon      {d['address']} (splitlm-trunkd {d['server_version']}): {p['model_id']}, layers "
              f"{p['trunk_start']}:{p['trunk_end']} of {p['num_layers']} on {p['device']}, {p['dtype'].lower()}, "
              f"{d['sessions_open']} sessions open")
    if route_out is not None:
        hops = " -> ".join(f"{s['layers'][0]}:{s['layers'][1]}" for s in route_out["stages"])
        print(f"route       layers {route_out['layers'][0]}:{route_out['layers'][1]} in "
              f"{len(route_out['stages'])} hop{'s' if len(route_out['stages']) != 1 else ''}: {hops}")
        print(f"fingerprint {route_out['fingerprint']}")
    else:
        print(f"splitlm: error: {problem}", file=sys.stderr)
    return code


def cmd_monitor(args: argparse.Namespace) -> int:
    """Print the daemon's monitor stream until Ctrl-C (exit 0) or the reader goes away; with
    several ``--trunk`` addresses, every daemon's, each line led by its address (``--json``: an
    ``address`` field)."""
    from ..shared.monitor import check_interval, format_line

    interval = check_interval(args.interval)
    client = _client(args)
    several = len(args.trunk) > 1
    if several:
        samples, cancel = _merged_monitors(client.clients, interval)
    else:
        if not args.json:  # a trunk cut over devices (splitlm-trunkd --devices): which serves which layers
            placement = client.info().plan.placement
            if placement:
                print("trunk over devices: " + "; ".join(f"layers {p.start}:{p.end} on {p.device}"
                                                         for p in placement), flush=True)
        stream = client.monitor(interval)
        samples, cancel = ((client.address, s) for s in stream), stream.cancel
    try:
        for address, sample in samples:
            if args.json:
                line = json.dumps({"address": address, **sample.to_dict()} if several else sample.to_dict())
            else:
                line = f"{address}  {format_line(sample)}" if several else format_line(sample)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        return ExitCode.OK
    except BrokenPipeError:  # `splitlm monitor | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    finally:
        cancel()  # main() closes the clients
    return ExitCode.FAILURE  # unreachable: the streams end with an error or by cancel


def _merged_monitors(clients: Sequence[Any], interval: float) -> tuple[Iterator[tuple[str, Any]], Callable[[], None]]:
    """Every daemon's monitor stream, each read on its own thread, merged as the samples come:
    ``(address, sample)``; the first stream to fail (or end) raises its error from the iteration.
    The second value cancels every stream (any thread)."""
    import queue
    import threading

    merged: queue.Queue[tuple[str, Any]] = queue.Queue()
    streams = [(c.address, c.monitor(interval)) for c in clients]

    def follow(address: str, stream: Any) -> None:
        try:
            for sample in stream:  # a cancelled stream ends quietly
                merged.put((address, sample))
        except SplitlmError as e:
            merged.put((address, e))

    for address, stream in streams:
        threading.Thread(target=follow, args=(address, stream), name=f"splitlm-monitor-{address}", daemon=True).start()

    def samples() -> Iterator[tuple[str, Any]]:
        while True:
            try:
                address, item = merged.get(timeout=0.5)  # a timeout, so Ctrl-C is seen at once
            except queue.Empty:
                continue
            if isinstance(item, SplitlmError):
                raise item
            yield address, item

    def cancel() -> None:
        for _, stream in streams:
            stream.cancel()

    return samples(), cancel


if __name__ == "__main__":
    sys.exit(main())
