"""Checkpoints: a directory with `model.json` (metadata) and `model.safetensors` (tensors).

No pickle: safetensors holds raw tensors and JSON holds everything else, so loading never runs code.
- full precision: tensor `embedding`, float32 (n_users + n_items, dim), users first
- quantized: tensor `rows`, uint8 (n_users + n_items, row_bytes) in the packed row format of
  gnaq_stream.quant.packing
- optional `edges`, int64 (E, 2): the (user, item) training edges, so a streaming learner started
  from the checkpoint knows the graph the model was trained on
- optional `item_bias`, float32 (n_items,): a score offset per item (gnaq-paper)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gnaq_stream.errors import CheckpointError, ConfigError
from gnaq_stream.quant.packing import check_row_format, model_size, pack_rows, unpack_rows
from gnaq_stream.quant.quantizer import dequantize

FORMAT = "gnaq-stream/1"
ACTIVATIONS = ("none", "tanh")  # applied to the layer-0 embedding (gnaq-paper: tanh of the dequantised values)
META_FILE, TENSOR_FILE = "model.json", "model.safetensors"


@dataclass
class StoredModel:
    """What a checkpoint holds: float layer-0 embeddings, or packed codes + levels."""

    method: str
    n_users: int
    n_items: int
    dim: int
    n_layers: int
    bits: int | None = None
    level_dtype: str = "fp32"
    activation: str = "none"
    embedding: torch.Tensor | None = None
    codes: np.ndarray | None = None
    levels: torch.Tensor | None = None
    edges: np.ndarray | None = None  # (E, 2) int64 training edges (user, item), for streaming starts
    item_bias: torch.Tensor | None = None  # (n_items,) float32 score offsets, added to u.i
    extra: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items

    def layer0(self) -> torch.Tensor:
        """Float32 layer-0 embeddings as the model uses them (dequantised, activation applied)."""
        x = self.embedding if self.bits is None else dequantize(self.levels, torch.from_numpy(self.codes))
        return torch.tanh(x) if self.activation == "tanh" else x

    def size(self):
        size = model_size(self.n_nodes, self.dim, self.bits, self.level_dtype)
        if self.item_bias is None:
            return size
        return replace(size, bytes_model=size.bytes_model + 4 * self.n_items)


def save_checkpoint(model: StoredModel, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "method": model.method, "n_users": model.n_users, "n_items": model.n_items,
            "dim": model.dim, "n_layers": model.n_layers, "bits": model.bits, "level_dtype": model.level_dtype,
            "activation": model.activation, **model.extra}
    if model.bits is None:
        tensors = {"embedding": model.embedding.detach().float().contiguous()}
    else:
        check_row_format(model.dim, model.bits, model.level_dtype)  # never write what loading refuses
        rows = pack_rows(model.codes, model.levels, model.bits, model.level_dtype)
        tensors = {"rows": torch.from_numpy(rows)}
    if model.item_bias is not None:
        tensors["item_bias"] = model.item_bias.detach().float().contiguous()
    if model.edges is not None:
        tensors["edges"] = torch.from_numpy(np.ascontiguousarray(model.edges, dtype=np.int64))
    save_file(tensors, str(out / TENSOR_FILE))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _require(meta: dict, key: str, kind: type, path: Path):
    value = meta.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"{path}: field {key!r} missing or not {kind.__name__}")
    return value


def load_checkpoint(path: str | Path) -> StoredModel:
    """Load and validate a checkpoint directory; any defect is a CheckpointError naming the file."""
    root = Path(path)
    meta_path, tensor_path = root / META_FILE, root / TENSOR_FILE
    if not meta_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(f"{root}: not a checkpoint (expected {META_FILE} and {TENSOR_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown format (expected {FORMAT!r})")
    model = StoredModel(
        method=_require(meta, "method", str, meta_path), n_users=_require(meta, "n_users", int, meta_path),
        n_items=_require(meta, "n_items", int, meta_path), dim=_require(meta, "dim", int, meta_path),
        n_layers=_require(meta, "n_layers", int, meta_path), bits=meta.get("bits"),
        level_dtype=meta.get("level_dtype", "fp32"), activation=meta.get("activation", "none"),
        extra={k: v for k, v in meta.items() if k not in {"format", "method", "n_users", "n_items", "dim",
                                                          "n_layers", "bits", "level_dtype", "activation"}})
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensor_path}: unreadable ({exc})") from None
    if model.activation not in ACTIVATIONS:
        raise CheckpointError(f"{meta_path}: activation must be one of {ACTIVATIONS}, got {model.activation!r}")
    n = model.n_nodes
    try:
        if model.bits is None:
            emb = tensors.get("embedding")
            if emb is None or tuple(emb.shape) != (n, model.dim) or emb.dtype != torch.float32:
                raise CheckpointError(f"{tensor_path}: expected float32 'embedding' of shape ({n}, {model.dim})")
            model.embedding = emb
        else:
            expected = (n, check_row_format(model.dim, model.bits, model.level_dtype))
            rows = tensors.get("rows")
            if rows is None or tuple(rows.shape) != expected or rows.dtype != torch.uint8:
                raise CheckpointError(f"{tensor_path}: expected uint8 'rows' of shape {expected}")
            model.codes, model.levels = unpack_rows(rows.numpy(), model.dim, model.bits, model.level_dtype)
    except (ValueError, TypeError, ConfigError) as exc:  # a row format packing does not support
        raise CheckpointError(f"{meta_path}: {exc}") from None
    edges = tensors.get("edges")
    if edges is not None:
        if edges.dtype != torch.int64 or edges.ndim != 2 or edges.shape[1] != 2:
            raise CheckpointError(f"{tensor_path}: 'edges' must be int64 of shape (E, 2)")
        e = edges.numpy()
        if len(e) and (e.min() < 0 or e[:, 0].max() >= model.n_users or e[:, 1].max() >= model.n_items):
            raise CheckpointError(f"{tensor_path}: 'edges' refer to nodes outside the model")
        model.edges = e
    bias = tensors.get("item_bias")
    if bias is not None:
        if bias.dtype != torch.float32 or tuple(bias.shape) != (model.n_items,) or not torch.isfinite(bias).all():
            raise CheckpointError(f"{tensor_path}: 'item_bias' must be finite float32 of shape ({model.n_items},)")
        model.item_bias = bias
    if model.bits is not None and not torch.isfinite(model.levels).all():
        raise CheckpointError(f"{tensor_path}: non-finite levels")
    return model
