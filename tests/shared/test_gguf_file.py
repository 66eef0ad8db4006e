"""``gguf_file.read_tensors`` gives each tensor what ``gguf.GGUFReader`` gives: the loading path's
values cannot change with the faster reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitlm.shared.models.gguf_file import read_tensors


@pytest.mark.realmodel
def test_tensor_table_matches_gguf_reader(smollm2_path: Path) -> None:
    from gguf import GGUFReader, dequantize

    ours = read_tensors(smollm2_path)
    theirs = GGUFReader(str(smollm2_path))
    assert ours.architecture == "llama"
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type, a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name
    for a, b in list(zip(ours.tensors, theirs.tensors))[:6]:  # the dequantised values too
        assert np.array_equal(dequantize(a.data, a.tensor_type), dequantize(b.data, b.tensor_type)), a.name


def test_not_a_gguf_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "x.gguf"
    f.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_tensors(f)
