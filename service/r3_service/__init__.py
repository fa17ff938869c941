"""r3: R3 (Regularized Relevance Reward) scoring service."""

from r3_client import __version__

__all__ = ["__version__"]
