"""What the bench's options become: its settings and the arguments of the daemon it starts."""

from __future__ import annotations

import argparse

import pytest

from splitlm.tui.bench.options import BenchOptions, add_arguments
from splitlm.tui.bench.run import daemon_args


def _opts(*argv: str, trunk: str | None = None) -> BenchOptions:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return BenchOptions.from_args(p.parse_args(list(argv)), trunk)


def test_defaults_and_quick() -> None:
    o = _opts()
    assert o.prompt_lengths == (16, 64, 256, 512, 1024) and o.concurrency == (1, 2, 4, 8, 16, 32)
    assert (o.new_tokens, o.warmup, o.repeats) == (32, 1, 3)
    q = _opts("--quick", "--repeats", "2")
    assert q.quick and q.repeats == 2 and q.new_tokens == 16 and q.concurrency == (1, 8)


def test_the_config_layers_defaults_mean_unset() -> None:
    # the CLI's config layering fills auto/exact in; the bench passes nothing for them
    o = _opts("--weights", "auto", "--wire-dtype", "exact", "--dtype", "auto")
    assert (o.weights, o.wire_dtype, o.dtype) == (None, None, None)
    assert daemon_args(o, 8) == ["--model", "smollm2", "--log-level", "WARNING", "--max-sessions", "64",
                                 "--idle-timeout", "0"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--weights", "int8"], ["--weights", "int8"]),
        (["--dtype", "bfloat16"], ["--dtype", "bfloat16"]),
        (["--threads", "1"], ["--threads", "1"]),  # the daemon gets the client's threads...
        (["--threads", "2", "--daemon-threads", "1"], ["--threads", "1"]),  # ...unless told otherwise
        (["--batch"], ["--batch"]),
        (["--split", "3:7"], ["--split", "3:7"]),
    ],
)
def test_settings_reach_the_daemon(argv: list[str], expected: list[str]) -> None:
    args = daemon_args(_opts(*argv), 32)
    assert " ".join(expected) in " ".join(args)


def test_wire_dtype_is_the_clients_alone() -> None:
    o = _opts("--wire-dtype", "bfloat16")
    assert o.wire_dtype == "bfloat16" and "bfloat16" not in daemon_args(o, 1)
    assert _opts("--threads", "2", trunk="unix:/x").daemon_threads is None


def test_max_prompt_length_is_resolved_against_the_context() -> None:
    from splitlm.tui.bench.options import MAX_LENGTH
    from splitlm.tui.bench.run import _prompts

    o = _opts("--prompt-lengths", "1024,16,max", "--new-tokens", "8")
    assert o.prompt_lengths == (MAX_LENGTH, 16, 1024)
    prompts = _prompts(o, None, 100, 512)  # 1024 does not fit 512 positions; max is 512 - 8
    assert sorted(prompts) == [16, 504] and len(prompts[504]) == 504
