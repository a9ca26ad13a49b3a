import json

import numpy as np
import pytest
import torch

from safetensors.torch import save_file

from gnaq_stream.checkpoint import FORMAT, StoredModel, load_checkpoint, save_checkpoint
from gnaq_stream.errors import CheckpointError, ConfigError
from gnaq_stream.quant.packing import LevelRangeError


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


def test_a_row_not_smaller_than_fp32_is_neither_saved_nor_loaded(tmp_path):
    rng = np.random.default_rng(0)
    model = StoredModel(method="gnaq", n_users=1, n_items=1, dim=64, n_layers=3, bits=8, level_dtype="fp8",
                        codes=rng.integers(0, 256, (2, 64), dtype=np.uint8), levels=torch.zeros(2, 256))
    with pytest.raises(ConfigError, match="320 bytes per node at dim 64"):
        save_checkpoint(model, tmp_path)
    # one written by an older version, before 8 bits at dim 64 was refused
    save_file({"rows": torch.zeros(2, 320, dtype=torch.uint8)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps({"format": FORMAT, "method": "gnaq", "n_users": 1, "n_items": 1,
                                                     "dim": 64, "n_layers": 3, "bits": 8, "level_dtype": "fp8"}))
    with pytest.raises(CheckpointError, match="320 bytes per node at dim 64, not less than float32's 256"):
        load_checkpoint(tmp_path)


def test_levels_the_dtype_cannot_hold_are_not_saved(tmp_path):
    model = _quantized()
    model.levels[3, 1] = 1e5  # beyond fp16
    with pytest.raises(LevelRangeError, match="levels of 1 of 5 rows do not fit fp16"):
        save_checkpoint(model, tmp_path)


def test_an_item_bias_is_stored_and_checked(tmp_path):
    model = _quantized()
    model.item_bias = torch.linspace(-1, 1, model.n_items)
    save_checkpoint(model, tmp_path)
    assert torch.equal(load_checkpoint(tmp_path).item_bias, model.item_bias)
    model.item_bias = torch.zeros(model.n_items + 1)
    save_checkpoint(model, tmp_path)
    with pytest.raises(CheckpointError, match="'item_bias' must be finite float32 of shape"):
        load_checkpoint(tmp_path)


def test_the_activation_is_stored_and_applied(tmp_path):
    model = _quantized()
    model.method, model.activation = "gnaq-paper", "tanh"
    save_checkpoint(model, tmp_path)
    back = load_checkpoint(tmp_path)
    assert back.activation == "tanh"
    torch.testing.assert_close(back.layer0(), torch.tanh(back.levels.gather(1, torch.from_numpy(back.codes).long())))
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["activation"] = "relu"
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="activation must be one of"):
        load_checkpoint(tmp_path)
