"""Regenerate the Python modules of the wire contract, or check that the committed ones are fresh.

    python protos/generate.py          # rewrite protos/splitlm/v1/trunk_pb2*.py
    python protos/generate.py --check  # exit 1 when they differ from a fresh generation

The protos folder is imported as ``splitlm.protos``, so the generated gRPC module's absolute
import of ``splitlm.v1.trunk_pb2`` is rewritten to a relative one. The descriptor keeps its file
name ``splitlm/v1/trunk.proto`` (what reflection shows).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "splitlm/v1/trunk.proto"
OUTPUTS = ("trunk_pb2.py", "trunk_pb2.pyi", "trunk_pb2_grpc.py")


def generate(out_root: Path) -> dict[str, str]:
    """Run protoc into ``out_root``; return the generated files' text by name."""
    from grpc_tools import protoc

    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(
        ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
         f"--grpc_python_out={out_root}", str(HERE / PROTO)]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    texts = {}
    for name in OUTPUTS:
        text = (out_root / "splitlm" / "v1" / name).read_text()
        text = re.sub(r"^from splitlm\.v1 import trunk_pb2 as", "from . import trunk_pb2 as", text, flags=re.M)
        texts[name] = text
    return texts


def stale() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    target = HERE / "splitlm" / "v1"
    return [n for n, t in fresh.items() if not (target / n).exists() or (target / n).read_text() != t]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = ap.parse_args()
    if args.check:
        names = stale()
        if names:
            print(f"stale generated code: {', '.join(names)}; run `make proto`", file=sys.stderr)
            return 1
        print("generated code is fresh")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    for name, text in fresh.items():
        (HERE / "splitlm" / "v1" / name).write_text(text)
    print(f"wrote {', '.join(fresh)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
