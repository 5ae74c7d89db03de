"""Imported by a study script run as a file (``python studies/compare_priors.py``).

Makes ``pyro_lvm`` this checkout's package, whatever else is installed, without putting the
repository root (whose folders are named ``models``, ``inference``, ...) or this folder on
``sys.path``: a user's own ``models.py`` or ``inference.py`` keeps its name.
"""
import importlib.util
import pathlib
import sys

_STUDIES = pathlib.Path(__file__).resolve().parent
_ROOT = _STUDIES.parent

# Python put this folder first on sys.path to run the script; drop it so that study helper
# modules (runner, datasets) are reachable only as pyro_lvm.studies.*.
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _STUDIES]

if "pyro_lvm" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "pyro_lvm", _ROOT / "pyro_lvm" / "__init__.py",
        submodule_search_locations=[str(_ROOT / "pyro_lvm")])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["pyro_lvm"] = _module
    _spec.loader.exec_module(_module)
