"""Training losses, one per module."""

from synthvox.losses.contrastive import MultiLayerContrastiveLoss, ProjectionHead, supcon_loss

__all__ = ["MultiLayerContrastiveLoss", "ProjectionHead", "supcon_loss"]
