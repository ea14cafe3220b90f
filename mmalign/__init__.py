"""mmalign: align image and video generators and vision-language models with rewards."""

from mmalign.media import MediaBatch

__version__ = "0.1.0.dev0"
__all__ = ["MediaBatch", "__version__"]
