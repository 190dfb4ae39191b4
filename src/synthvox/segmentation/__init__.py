"""Few-shot segmentation: finetune the feature network on one to a few labelled volumes, then segment.

>>> from synthvox.segmentation import finetune, segment
>>> model_dir = finetune([image], [labels], out_dir="MODEL", init="default", steps=2000, device="cuda")
>>> seg = segment(model_dir, new_image)     # label map on new_image's grid, training label ids
>>> segment_folder("imagesTs", "predictions", model_segmenter(model_dir))   # every NIfTI of a folder
"""

from synthvox.segmentation.augment import AugmentConfig
from synthvox.segmentation.config import FinetuneConfig
from synthvox.segmentation.folder import (
    Segmenter,
    folder_jobs,
    model_segmenter,
    segment_files,
    segment_folder,
)
from synthvox.segmentation.infer import segment, segment_with
from synthvox.segmentation.loop import finetune
from synthvox.segmentation.modeldir import SegmentationMeta, SegmentationNet, load_model_dir, read_meta

__all__ = [
    "AugmentConfig",
    "FinetuneConfig",
    "Segmenter",
    "SegmentationMeta",
    "SegmentationNet",
    "finetune",
    "folder_jobs",
    "load_model_dir",
    "model_segmenter",
    "read_meta",
    "segment",
    "segment_files",
    "segment_folder",
    "segment_with",
]
