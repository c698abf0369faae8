"""Atomic checkpoint writes and safe reads: the library's implementation, for the recipes."""

from implicitbilevel.bissl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]
