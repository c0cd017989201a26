"""tallmasks: merge and compress fine-tuned checkpoints of one foundation model.

Task Arithmetic, TIES, weight averaging, magnitude masking, TALL masks and Consensus merging
(Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024).
"""

from tallmasks.core.errors import CheckpointError, ConfigError, DatasetMissingError, TallmasksError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DatasetMissingError", "TallmasksError", "__version__"]
