import json

import numpy as np
import pytest
import torch

from gnaq_stream.checkpoint import StoredModel, load_checkpoint, save_checkpoint
from gnaq_stream.errors import CheckpointError


def _quantized(bits=2):
    rng = np.random.default_rng(0)
    return StoredModel(method="gnaq", n_users=3, n_items=2, dim=8, n_layers=3, bits=bits, level_dtype="fp16",
                       codes=rng.integers(0, 1 << bits, (5, 8), dtype=np.uint8),
                       levels=torch.linspace(-1, 1, 5 * (1 << bits)).reshape(5, -1))


def test_quantized_round_trip(tmp_path):
    model = _quantized()
    save_checkpoint(model, tmp_path)
    back = load_checkpoint(tmp_path)
    np.testing.assert_array_equal(back.codes, model.codes)
    torch.testing.assert_close(back.levels, model.levels.half().float())
    assert back.size().bytes_model == 5 * (2 + 8)


def test_fp_round_trip(tmp_path):
    model = StoredModel(method="fp", n_users=2, n_items=2, dim=4, n_layers=3, embedding=torch.randn(4, 4))
    save_checkpoint(model, tmp_path)
    torch.testing.assert_close(load_checkpoint(tmp_path).layer0(), model.embedding)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def test_corrupt_tensor_file(tmp_path):
    save_checkpoint(_quantized(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_corrupt_metadata(tmp_path):
    save_checkpoint(_quantized(), tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_metadata_disagreeing_with_tensors(tmp_path):
    save_checkpoint(_quantized(), tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["dim"] = 16
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expected uint8 'rows'"):
        load_checkpoint(tmp_path)
    meta["dim"], meta["bits"] = 8, 5
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="bits must be one of"):
        load_checkpoint(tmp_path)
