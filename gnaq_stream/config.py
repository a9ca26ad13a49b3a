"""Settings as dataclasses; CLI flags and `GNAQ_*` environment variables map onto them."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from gnaq_stream.errors import ConfigError
from gnaq_stream.model.gnaq import method_spec
from gnaq_stream.quant.packing import check_bits, check_level_dtype


@dataclass(frozen=True)
class TrainConfig:
    method: str = "gnaq"
    bits: int = 2
    dim: int = 64
    n_layers: int = 3
    epochs: int = 20
    batch_size: int = 32768
    lr: float = 1e-2
    qat_lr: float = 1e-3
    reg: float = 1e-4
    n_negatives: int = 4
    lambda_weight: float = 1.0
    rau_alpha: float = 0.5
    rau_half_degree: float = 10.0
    rau_every: int = 1
    level_dtype: str = "fp8"
    eval_every: int = 1
    patience: int = 3
    threads: int = 2
    seed: int = 2025

    def __post_init__(self) -> None:
        positive = ("dim", "n_layers", "epochs", "batch_size", "n_negatives", "rau_every", "eval_every", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.rau_alpha <= 1.0:
            raise ConfigError(f"rau_alpha must be in [0, 1], got {self.rau_alpha}")
        check_bits(self.bits)
        check_level_dtype(self.level_dtype)
        method_spec(self.method)
        if self.rau_half_degree <= 0:
            raise ConfigError(f"rau_half_degree must be > 0, got {self.rau_half_degree}")
        if self.lambda_weight < 0 or self.lr <= 0 or self.qat_lr <= 0 or self.reg < 0:
            raise ConfigError("lambda_weight and reg must be >= 0, learning rates > 0")


def env_defaults(cls: type, prefix: str = "GNAQ_") -> dict[str, object]:
    """Values of `cls`'s fields found in the environment, e.g. GNAQ_BATCH_SIZE=16384."""
    found: dict[str, object] = {}
    for f in fields(cls):
        raw = os.environ.get(prefix + f.name.upper())
        if raw is None:
            continue
        kind = type(f.default)
        try:
            found[f.name] = kind(raw)
        except ValueError:
            raise ConfigError(f"{prefix}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
    return found
