"""sats: continual (class-incremental) semantic segmentation in modern PyTorch."""

__version__ = "0.1.0"
