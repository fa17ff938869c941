"""r3: R3 (Regularized Relevance Reward) scoring service."""

__version__ = "0.1.0"
