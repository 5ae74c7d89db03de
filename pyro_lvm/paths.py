"""Where pyro-lvm looks for things on disk: the checkout it runs from (if any) and outputs.

Nothing here looks relative to ``site-packages``: an installed copy finds data through
``$PYRO_LVM_DATA``, ``--data-path`` or the current directory, and writes its outputs under
the current directory.
"""
from __future__ import annotations

import pathlib
from typing import Optional

#: Default parent of every study's output folder, relative to the current directory.
DEFAULT_OUT_DIR = "pyro-lvm-out"


def checkout_root() -> Optional[pathlib.Path]:
    """The repository root when this code runs from a checkout of pyro-lvm, else None.

    A checkout is recognised by a ``pyproject.toml`` naming the ``pyro-lvm`` distribution
    beside the ``models/`` folder this package was loaded from.
    """
    import pyro_lvm.models
    root = pathlib.Path(pyro_lvm.models.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    return root if 'name = "pyro-lvm"' in text else None


def git_checkout_root() -> Optional[pathlib.Path]:
    """:func:`checkout_root` when it is also a git work tree (provenance records its commit)."""
    root = checkout_root()
    return root if root is not None and (root / ".git").exists() else None
