"""The tensor codec and the sampler, without a model."""

from __future__ import annotations

import pytest
import torch

from splitlm.protos import trunk_pb2 as pb
from splitlm.shared import codec
from splitlm.shared.errors import InvalidStep, UsageError
from splitlm.shared.sampling import Sampler, SamplingSettings


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codec_round_trip_is_exact(dtype) -> None:  # type: ignore[no-untyped-def]
    t = torch.randn(1, 3, 8).to(dtype)
    msg = codec.encode(t)
    assert len(msg.data) == t.numel() * t.element_size()
    assert torch.equal(codec.decode(pb.Tensor.FromString(msg.SerializeToString())), t)


def test_codec_rejects_wrong_length_and_dtype() -> None:
    msg = codec.encode(torch.zeros(1, 2, 4))
    msg.data = msg.data[:-1]
    with pytest.raises(InvalidStep, match="needs 32 bytes"):
        codec.decode(msg)
    with pytest.raises(InvalidStep, match="dtype"):
        codec.decode(pb.Tensor(dtype=99, shape=[1], data=b"\0\0\0\0"))


def test_greedy_is_argmax_and_sampling_is_seeded() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingSettings())(logits) == 1
    s = SamplingSettings(temperature=1.0, top_k=3, top_p=0.9, seed=7)
    a = [Sampler(s)(logits) for _ in range(5)]
    assert a == [Sampler(s)(logits) for _ in range(5)]
    assert all(x in (1, 2) for x in [Sampler(SamplingSettings(temperature=1.0, top_k=2, seed=i))(logits) for i in range(20)])


def test_sampling_settings_are_validated() -> None:
    for kw in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(UsageError):
            SamplingSettings(**kw)  # type: ignore[arg-type]
