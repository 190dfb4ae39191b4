"""Training: typed configs, contrastive pretraining (single process or DDP), checkpoints."""

from synthvox.train.config import PRESETS, PretrainConfig, resolve_config
from synthvox.train.pretrain import PretrainResult, pretrain

__all__ = ["PRESETS", "PretrainConfig", "PretrainResult", "pretrain", "resolve_config"]
