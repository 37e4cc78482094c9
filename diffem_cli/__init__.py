"""diffem: learn clean diffusion models from corrupted data alone (DiffEM, arXiv:2510.12691)."""

__version__ = "0.1.0"
