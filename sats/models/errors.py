"""The error of weight files (checkpoints, converters, builtin weights), shared by the weight modules."""

from __future__ import annotations


class WeightsError(ValueError):
    """A checkpoint that cannot be read, recognised or matched to the encoder."""
