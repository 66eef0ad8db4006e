"""``splitlm distill``: wires data, teacher, student, the loop, checkpoints and the outputs.

Everything a run needs to go on after a kill is in ``OUTPUT/checkpoint.pt`` (written whole or not
at all: a temporary file, then ``os.replace``): the trainable weights, the optimizer's state, the
step, tokens seen, the RNG state, the data position (epoch and index into that epoch's seeded
order) and the history of evaluations. The blocks themselves are in ``OUTPUT/data.json``, so a
resumed run sees exactly the data the first one generated. The student directory (``student.json``
and its weights) is rewritten with every checkpoint, the loss curve (``loss.png``) at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...shared.errors import ExitCode, UsageError

if TYPE_CHECKING:

    from ...shared.prepare import LoadedModel
    from .train import Student

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
DATA = "data.json"
PLOT = "loss.png"
CKPT_FORMAT = "splitlm-distill-checkpoint"
K_ROUND_TRIP = 4
"""Draft length the summary's tokens-per-round-trip figure assumes."""


@dataclass(frozen=True)
class RunConfig:
    """What a resumed run must share with the run it continues (kept in the checkpoint)."""

    kind: str
    plan: tuple[int, int] | None
    layers: int
    init_from: tuple[int, ...]
    seq_len: int
    batch_size: int
    lr: float
    temperature: float
    hard_weight: float
    seed: int


@dataclass
class State:
    """The loop's position: restored from a checkpoint, saved into the next."""

    step: int = 0
    tokens: int = 0
    train_s: float = 0.0
    cpu_s: float = 0.0
    """CPU time of the training steps (all threads): on a shared machine, what the run really got."""
    epoch: int = 0
    index: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)


def _progress(total: int, initial: int) -> Any:
    """A tqdm bar on stderr when it is a terminal, else None (log lines instead)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, file=sys.stderr, unit="step", dynamic_ncols=True)


def _note(text: str, bar: Any) -> None:
    if bar is not None:
        bar.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


def _order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """Raises: UsageError: missing, corrupt or truncated, or not a distill checkpoint."""
    import torch

    if not path.is_file():
        raise UsageError(f"--resume: no {CHECKPOINT} in {path.parent} to resume from (run without --resume first)")
    try:
        ckpt = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling, zip and tensor errors all mean one thing here
        raise UsageError(f"--resume: {path} is corrupt or truncated ({type(e).__name__}); "
                         "nothing was changed; start again with another --output") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UsageError(f"--resume: {path} is not a splitlm distill checkpoint")
    return ckpt


def _resolve_plan(args: argparse.Namespace, model: LoadedModel, client: Callable[[], Any]) -> tuple[int, int]:
    """The plan a bridge is made for: the daemon's with an explicit ``--trunk``, else ``--split``,
    else the family's default (the daemon's default)."""
    from ...shared.plan import SplitPlan, default_split

    L, model_type = model.num_layers, str(model.source.config.model_type)
    if args.client_config.source("trunk") != "default":
        info = client().info()
        p = info.plan
        if (p.config_digest, p.weights_digest) != (model.source.config_digest(), model.source.weights_digest()):
            raise UsageError(f"the daemon serves {p.model_id!r}, not the model here ({model.source.model_id}): "
                             "pass the daemon's model with --model")
        if args.split and tuple(args.split) != (p.trunk_start, p.trunk_end):
            raise UsageError(f"--split {args.split[0]}:{args.split[1]} is not the daemon's plan "
                             f"{p.trunk_start}:{p.trunk_end}")
        return (p.trunk_start, p.trunk_end)
    if args.split:
        return SplitPlan(L, *args.split).split
    return SplitPlan(L, *default_split(L, model_type)).split


def run(args: argparse.Namespace, client: Callable[[], Any]) -> int:
    """``splitlm distill``: the summary on stdout (text or ``--json``), progress on stderr."""
    import torch

    from ...shared import prepare
    from ...shared.draft import student as fmt
    from ...shared.models import PartSpec, build_parts, resolve_device
    from . import data as data_mod
    from .train import BridgeStudent, StandaloneStudent, Teacher, evenly_spaced

    if args.output is None:
        raise UsageError("distill needs --output DIR: where the student and its checkpoints go")
    out: Path = args.output
    ckpt: dict[str, Any] | None = None
    if args.resume:
        ckpt = _load_checkpoint(out / CHECKPOINT)
        if not (out / DATA).is_file():
            raise UsageError(f"--resume: {out / DATA} is missing; the run cannot see its data again")
    elif (out / CHECKPOINT).exists() or (out / fmt.MANIFEST).exists():
        raise UsageError(f"--output {out} already holds a distill run: pass --resume to continue it, "
                         "or another --output")
    corpus = None
    if ckpt is None:
        corpus = data_mod.read_corpus(args.data) if args.data else data_mod.shipped_prompts()

    t_load = time.perf_counter()
    device = resolve_device(args.device)
    model = prepare.load_model(args.model)
    base = fmt.base_of(model)
    L = model.num_layers
    seed = args.seed if args.seed is not None else 0
    torch.manual_seed(seed)
    if ckpt is not None:
        if ckpt["base"] != asdict(base):
            raise UsageError(f"--resume: the run in {out} distils {ckpt['base']['model']}, not the model here "
                             f"({base.model}): pass its --model")
        rc = RunConfig(**{**ckpt["run"], "plan": tuple(ckpt["run"]["plan"]) if ckpt["run"]["plan"] else None,
                          "init_from": tuple(ckpt["run"]["init_from"])})
    else:
        kind = "standalone" if args.standalone else "bridge"
        if kind == "bridge":
            plan: tuple[int, int] | None = _resolve_plan(args, model, client)
            a, b = plan  # type: ignore[misc]
            if not 1 <= args.layers <= b - a:
                raise UsageError(f"--layers {args.layers}: a bridge for the plan {a}:{b} has 1 to {b - a} layers")
            init_from = tuple(evenly_spaced(a, b, args.layers))
        else:
            plan = None
            if not 1 <= args.layers < L:
                raise UsageError(f"--layers {args.layers}: a standalone student of this {L}-layer model has 1 to {L - 1}")
            init_from = tuple(evenly_spaced(0, L, args.layers))
        rc = RunConfig(kind, plan, args.layers, init_from, args.seq_len, args.batch_size, args.lr,
                       args.distill_temperature, args.hard_weight, seed)

    (full,) = build_parts(model.source, model.family, [PartSpec.full(L)], torch.float32, device)
    teacher = Teacher(full)
    student: Student
    if rc.kind == "bridge":
        assert rc.plan is not None
        mid = fmt.bridge_part(model, rc.plan, rc.layers, torch.float32, device)
        student = BridgeStudent(teacher, mid, rc.plan, rc.init_from)
    else:
        student = StandaloneStudent(teacher, rc.init_from)
    load_s = time.perf_counter() - t_load

    # ---- data: generated once, kept in OUTPUT/data.json
    gen_s = 0.0
    if ckpt is None:
        assert corpus is not None
        sequences = data_mod.text_ids(model.tokenizer, corpus.texts)
        if corpus.prompts:
            t0 = time.perf_counter()
            bar = _progress(len(corpus.prompts), 0)
            _note(f"distill: the teacher continues {len(corpus.prompts)} prompts ({corpus.source}), "
                  f"{args.gen_tokens} tokens each", bar)
            sequences += data_mod.continue_prompts(
                full.model, model.tokenizer, corpus.prompts, model.eos_ids, args.gen_tokens,
                args.gen_temperature, seed, on_batch=bar.update if bar is not None else None,
            )
            if bar is not None:
                bar.close()
            gen_s = time.perf_counter() - t0
        sep = model.eos_ids[0] if model.eos_ids else None
        blocks = data_mod.blocks_of(sequences, rc.seq_len, sep)
        train_blocks, eval_blocks = data_mod.split_blocks(blocks, seed, corpus.source)
        out.mkdir(parents=True, exist_ok=True)
        fmt.atomic_write_bytes(out / DATA, json.dumps({
            "source": corpus.source, "seq_len": rc.seq_len, "generate_s": gen_s,
            "train": train_blocks, "eval": eval_blocks,
        }).encode())
    else:
        try:
            d = json.loads((out / DATA).read_text())
            train_blocks, eval_blocks, gen_s = d["train"], d["eval"], float(d.get("generate_s", 0.0))
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--resume: {out / DATA} is corrupt ({e})") from None
    data_source = json.loads((out / DATA).read_text()).get("source", "") if ckpt is not None else corpus.source  # type: ignore[union-attr]

    params = student.named_parameters()
    opt = torch.optim.AdamW(list(params.values()), lr=rc.lr, weight_decay=0.0)
    state = State()
    if ckpt is not None:
        with torch.no_grad():
            for name, p in params.items():
                if name not in ckpt["params"]:
                    raise UsageError(f"--resume: {out / CHECKPOINT} lacks {name}")
                p.copy_(ckpt["params"][name])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        s = ckpt["state"]
        state = State(int(s["step"]), int(s["tokens"]), float(s["train_s"]), float(s.get("cpu_s", 0.0)),
                      int(s["epoch"]), int(s["index"]), list(s["history"]), [tuple(x) for x in s["losses"]])
        _note(f"distill: resuming {out} at step {state.step} ({state.tokens} tokens seen)", None)

    cut = rc.plan[0] if rc.plan else 1
    manifest = fmt.Manifest(rc.kind, base, rc.plan, rc.layers, rc.init_from)  # type: ignore[arg-type]

    def do_eval() -> None:
        r = evaluate_now()
        state.history.append({"step": state.step, "tokens": state.tokens, "train_s": state.train_s,
                              "eval_loss": r.loss, "acceptance": r.acceptance,
                              "tokens_per_round_trip": r.tokens_per_round_trip(K_ROUND_TRIP)})
        _note(f"distill: step {state.step}: eval loss {r.loss:.4f}, acceptance {r.acceptance:.3f} "
              f"({r.tokens_per_round_trip(K_ROUND_TRIP):.2f} tokens per round trip at k={K_ROUND_TRIP})", bar)

    def evaluate_now() -> Any:
        from .train import evaluate

        return evaluate(teacher, student, eval_blocks, rc.batch_size, rc.temperature, cut, device)

    def summary(final: bool) -> dict[str, Any]:
        last = state.history[-1] if state.history else {}
        first = state.history[0] if state.history else {}
        return {
            "steps": state.step, "tokens_seen": state.tokens, "train_s": round(state.train_s, 1),
            "tokens_per_s": round(state.tokens / state.train_s, 1) if state.train_s else 0.0,
            "train_cpu_s": round(state.cpu_s, 1),
            "data": data_source, "train_blocks": len(train_blocks), "eval_blocks": len(eval_blocks),
            "seq_len": rc.seq_len, "batch_size": rc.batch_size, "lr": rc.lr, "temperature": rc.temperature,
            "hard_weight": rc.hard_weight, "generate_s": round(gen_s, 1),
            "eval_loss": last.get("eval_loss"), "acceptance": last.get("acceptance"),
            "tokens_per_round_trip_k4": last.get("tokens_per_round_trip"),
            "step0_eval_loss": first.get("eval_loss") if first.get("step") == 0 else None,
            "step0_acceptance": first.get("acceptance") if first.get("step") == 0 else None,
            "finished": final,
        }

    def save(final: bool) -> None:
        """Checkpoint first (the run's truth), then the student, whose manifest is its commit."""
        nonlocal manifest
        blob = io.BytesIO()
        torch.save({
            "format": CKPT_FORMAT, "version": 1, "run": asdict(rc), "base": asdict(base),
            "params": {k: v.detach().cpu() for k, v in params.items()}, "optimizer": opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "state": {"step": state.step, "tokens": state.tokens, "train_s": state.train_s, "cpu_s": state.cpu_s,
                      "epoch": state.epoch,
                      "index": state.index, "history": state.history, "losses": [list(x) for x in state.losses]},
        }, blob)
        fmt.atomic_write_bytes(out / CHECKPOINT, blob.getvalue())
        manifest = fmt.Manifest(manifest.kind, base, rc.plan, rc.layers, rc.init_from, training=summary(final))
        if isinstance(student, BridgeStudent):
            manifest = fmt.save_bridge(out, manifest, student.layer_weights(), state.step)
        else:
            _save_standalone(out, student, model, manifest)

    bar = _progress(args.steps, state.step)
    if not state.history:
        do_eval()  # step 0: the untrained student (initialised from the base's layers)
    t_run = time.perf_counter()
    try:
        while state.step < args.steps:
            if args.time_limit and time.perf_counter() - t_run >= args.time_limit:
                _note(f"distill: --time-limit reached after {state.step} steps", bar)
                break
            t0, c0 = time.perf_counter(), time.process_time()
            order = _order(len(train_blocks), rc.seed, state.epoch)
            picked: list[list[int]] = []
            while len(picked) < rc.batch_size:
                if state.index >= len(order):
                    state.epoch, state.index = state.epoch + 1, 0
                    order = _order(len(train_blocks), rc.seed, state.epoch)
                picked.append(train_blocks[order[state.index]])
                state.index += 1
            from .train import Batch, distill_loss

            batch = Batch(torch.tensor(picked, device=device))
            t_logits, h0 = teacher.run(batch, cut)
            s_logits = student.logits(batch, h0)
            loss, _ = distill_loss(s_logits, t_logits, batch.ids, rc.temperature, rc.hard_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            state.step += 1
            state.tokens += batch.ids.numel()
            dt = time.perf_counter() - t0
            state.train_s += dt
            state.cpu_s += time.process_time() - c0
            state.losses.append((state.step, float(loss.detach())))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", tok_s=f"{batch.ids.numel() / dt:.0f}")
            if state.step % args.eval_every == 0:
                do_eval()
            if state.step % args.checkpoint_every == 0 and state.step < args.steps:
                save(final=False)
                _note(f"distill: checkpoint at step {state.step} ({state.tokens} tokens, loss {float(loss.detach()):.4f})", bar)
    finally:
        if bar is not None:
            bar.close()
    bar = None
    if not state.history or state.history[-1]["step"] != state.step:
        do_eval()
    save(final=True)
    _plot(out / PLOT, state)
    result = summary(True)
    result.update(output=str(out), kind=rc.kind, plan=list(rc.plan) if rc.plan else None, layers=rc.layers,
                  init_from=list(rc.init_from), load_s=round(load_s, 1), history=state.history)
    if args.json:
        print(json.dumps(result))
    else:
        _print_summary(result)
    return ExitCode.OK


def _save_standalone(out: Path, student: Any, model: LoadedModel, manifest: Any) -> None:
    """A normal model directory (``--model``, ``--draft model:``) plus the manifest, written last."""
    import os
    import tempfile

    from ...shared.draft import student as fmt

    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        student.model.save_pretrained(tmp, safe_serialization=True)
        model.tokenizer.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, out / f.name)
    m = fmt.Manifest(manifest.kind, manifest.base, None, manifest.layers, manifest.init_from, "model.safetensors",
                     fmt.file_sha256(out / "model.safetensors"), manifest.training)
    fmt.atomic_write_bytes(out / fmt.MANIFEST, m.to_json().encode())


def _plot(path: Path, state: State) -> None:
    """Training loss per step and held-out loss and acceptance per evaluation, by step (skipped,
    with a note, without matplotlib: the ``bench`` extra; the figures are in the summary anyway)."""
    try:
        import matplotlib
    except ImportError:
        _note(f"distill: no {PLOT}: matplotlib is not installed (pip install 'splitlm[bench]')", None)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...shared.draft.student import atomic_write_bytes

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if state.losses:
        steps = [s for s, _ in state.losses]
        ax1.plot(steps, [v for _, v in state.losses], lw=0.8, alpha=0.6, label="train loss")
    ax1.plot([h["step"] for h in state.history], [h["eval_loss"] for h in state.history], "o-", label="eval loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("KL to the teacher (x T^2)")
    ax1.legend()
    ax2.plot([h["step"] for h in state.history], [h["acceptance"] for h in state.history], "o-", color="C2")
    ax2.set_xlabel("step")
    ax2.set_ylabel("greedy acceptance (eval)")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _print_summary(r: dict[str, Any]) -> None:
    plan = f", plan {r['plan'][0]}:{r['plan'][1]}" if r["plan"] else ""
    print(f"student   {r['output']} ({r['kind']}, {r['layers']} layers from {r['init_from']}{plan})")
    print(f"data      {r['data']}: {r['train_blocks']} train / {r['eval_blocks']} eval blocks of {r['seq_len']} tokens")
    cpu = f", {r['train_cpu_s']} s of CPU" if r["train_cpu_s"] else ""  # (not kept by older checkpoints)
    print(f"trained   {r['steps']} steps, {r['tokens_seen']} tokens in {r['train_s']} s ({r['tokens_per_s']} tokens/s{cpu})")
    if r["step0_acceptance"] is not None:
        print(f"step 0    eval loss {r['step0_eval_loss']:.4f}, acceptance {r['step0_acceptance']:.3f}")
    print(f"final     eval loss {r['eval_loss']:.4f}, acceptance {r['acceptance']:.3f}, "
          f"{r['tokens_per_round_trip_k4']:.2f} tokens per round trip at k={K_ROUND_TRIP}")
    print(f"outputs   {r['output']}/student.json, {r['output']}/{PLOT}, {r['output']}/{CHECKPOINT}")
