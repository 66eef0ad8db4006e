"""Regenerate the Python modules of the wire contract, or check that the committed ones are fresh.

    python protos/generate.py          # rewrite protos/splitlm/v1/trunk_pb2{.py,.pyi,_grpc.py}
    python protos/generate.py --check  # exit 1 when they differ from a fresh generation

Runs ``grpc_tools.protoc -I protos``, so the descriptor keeps its file name
``splitlm/v1/trunk.proto`` (what reflection shows). The protos folder is imported as
``splitlm.protos``, so the generated gRPC module's absolute import of ``splitlm.v1.trunk_pb2`` is
rewritten to a relative one. The output depends on the grpcio-tools version, which the ``dev``
extra pins exactly.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "splitlm/v1/trunk.proto"
TARGET = HERE / "splitlm" / "v1"
OUTPUTS = ("trunk_pb2.py", "trunk_pb2.pyi", "trunk_pb2_grpc.py")
_ABSOLUTE_IMPORT = re.compile(r"^from splitlm\.v1 import (trunk_pb2 as \w+)$", re.MULTILINE)


def tools_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def generate(out_root: Path) -> dict[str, str]:
    """Run protoc into ``out_root``; return the generated files' text by name."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")  # the well-known types
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(HERE / PROTO),
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed (exit {rc}) on {HERE / PROTO}")
    texts = {}
    for name in OUTPUTS:
        text = (out_root / "splitlm" / "v1" / name).read_text()
        texts[name] = _ABSOLUTE_IMPORT.sub(r"from . import \1", text)
    if "from . import trunk_pb2 as" not in texts["trunk_pb2_grpc.py"]:
        raise SystemExit("trunk_pb2_grpc.py: the import of trunk_pb2 was not found to rewrite")
    return texts


def check() -> list[str]:
    """Names of committed generated files that are missing or differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    return [
        n for n, t in fresh.items() if not (TARGET / n).is_file() or (TARGET / n).read_text() != t
    ]


def write() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    for name, text in fresh.items():
        (TARGET / name).write_text(text)
    return list(fresh)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = ap.parse_args(argv)
    if args.check:
        names = check()
        if names:
            print(
                f"STALE: protos/splitlm/v1/{{{','.join(names)}}} differ from what grpcio-tools "
                f"{tools_version()} generates from protos/{PROTO}.\n"
                "Run `make proto` (python protos/generate.py) and commit the result "
                "(with the grpcio-tools version the dev extra pins).",
                file=sys.stderr,
            )
            return 1
        print(f"generated code is fresh (grpcio-tools {tools_version()})")
        return 0
    print(f"wrote {', '.join(write())} (grpcio-tools {tools_version()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
