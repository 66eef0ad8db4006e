"""The wire contract: the committed generated modules are fresh and import under splitlm.protos."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GENERATOR = Path(__file__).resolve().parents[1] / "protos" / "generate.py"


def _generator():  # type: ignore[no-untyped-def]
    # loaded from the repository by path: an installed copy would check site-packages instead
    spec = importlib.util.spec_from_file_location("_splitlm_protos_generate", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the protos")
    gen = _generator()
    stale = gen.check()
    assert not stale, (
        f"stale generated code in protos/splitlm/v1: {', '.join(stale)} (grpcio-tools "
        f"{gen.tools_version()}); run `make proto` and commit the result"
    )


def test_session_request_round_trip() -> None:
    from splitlm.protos import trunk_pb2 as pb
    from splitlm.protos import trunk_pb2_grpc

    assert pb.DESCRIPTOR.name == "splitlm/v1/trunk.proto"
    assert pb.DESCRIPTOR.package == "splitlm.v1"
    assert trunk_pb2_grpc.TrunkStub is not None

    data = bytes(range(24))  # (1, 3, 2) float32
    req = pb.SessionRequest(
        step=pb.Step(
            step_id=7, position=5, hidden=pb.Tensor(dtype=pb.FLOAT32, shape=[1, 3, 2], data=data)
        )
    )
    back = pb.SessionRequest.FromString(req.SerializeToString())
    assert back == req
    assert back.WhichOneof("kind") == "step"
    assert (back.step.step_id, back.step.position) == (7, 5)
    assert back.step.hidden.dtype == pb.FLOAT32
    assert list(back.step.hidden.shape) == [1, 3, 2]
    assert back.step.hidden.data == data
