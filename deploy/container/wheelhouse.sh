#!/usr/bin/env bash
# Fill deploy/container/wheels/ with every wheel the image's venv needs, for a build that cannot
# (or should not) reach an index: `podman build --build-arg PIP_ARGS=--no-index ...` then installs
# from these alone. Run on a machine with the image's Python (3.11) and CPU architecture (x86_64);
# on this project's machines pip takes torch from the CPU wheel on local disk (pip's find-links),
# never a CUDA build. The wheels are not committed (.gitignore).
#   deploy/container/wheelhouse.sh            # torch (CPU) + splitlm[daemon]'s dependencies
#   TORCH_VERSION=2.13.0 PYTHON=.venv/bin/python deploy/container/wheelhouse.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=deploy/container/wheels
py=${PYTHON:-python3}
torch="torch==${TORCH_VERSION:-2.13.0}"
mkdir -p "$out"
# torch first and alone, from the CPU index where pip's default would hand out the CUDA build
# (TORCH_PIP_ARGS as in the Makefile); then the rest, with torch already satisfied from $out
"$py" -m pip download -q -d "$out" --only-binary=:all: ${TORCH_PIP_ARGS:-} "$torch"
"$py" -m pip download -q -d "$out" --find-links "$out" 'setuptools>=77' wheel '.[daemon]' "$torch"
"$py" - "$out" <<'PY'
import re
import sys
from pathlib import Path

wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
# CUDA's libraries (nvidia_cublas_cu12, ...), triton, a +cuXYZ torch; nvidia_ml_py is NVML's bindings
cuda = [w.name for w in wheels if re.match(r"nvidia_\w*cu\d|triton-", w.name) or "+cu" in w.name]
if cuda:
    sys.exit(f"a CUDA build slipped into the CPU wheelhouse: {', '.join(cuda)}")
print(f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 2**20:.0f} MiB in {sys.argv[1]}")
PY
