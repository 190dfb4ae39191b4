"""synthvox: general-purpose voxel features for 3D biomedical volumes, learned from synthetic data."""

from synthvox.errors import InputError
from synthvox.volume import Volume

__version__ = "0.1.0"

__all__ = ["InputError", "Volume", "__version__"]
