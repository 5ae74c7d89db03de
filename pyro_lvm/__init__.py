"""pyro-lvm: latent variable models from factor analysis to deep latent variable models.

The namespace maps the repository's top-level folders:

- :mod:`pyro_lvm.models`: generative processes as Pyro model/guide pairs;
- :mod:`pyro_lvm.inference`: how any pair is fit, evaluated and diagnosed;
- :mod:`pyro_lvm.studies`: data sets, the study runner and one script per study;
- :mod:`pyro_lvm.reports`: the HTML report renderer.

The functions most sessions start from are re-exported here::

    from pyro_lvm import fit, ELBO, IWAE, log_likelihood, elbo, diagnose, check_contract
"""
import pathlib as _pathlib

_HERE = _pathlib.Path(__file__).resolve().parent
_ROOT = _HERE.parent
# In a checkout the subpackages are the repository's top-level folders (models/, inference/,
# studies/, reports/) beside this one; an installed wheel holds them inside this folder.
if not (_HERE / "models").is_dir() and (_ROOT / "models" / "__init__.py").is_file() \
        and (_ROOT / "pyproject.toml").is_file():
    __path__.append(str(_ROOT))  # noqa: F821 - the package's own search path

from pyro_lvm.inference import (ELBO, IWAE, check_contract, diagnose, elbo, fit,  # noqa: E402
                                log_likelihood)

__version__ = "0.1.0"
__all__ = ["fit", "ELBO", "IWAE", "log_likelihood", "elbo", "diagnose", "check_contract"]
