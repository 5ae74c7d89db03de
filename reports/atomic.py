"""Atomic file writes for the report renderer (one implementation, in :mod:`pyro_lvm._io`,
shared with the study runner and fit checkpoints)."""
from pyro_lvm._io import write_atomically

__all__ = ["write_atomically"]
