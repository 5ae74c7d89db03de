"""Fit any model/guide pair that keeps the contract by stochastic variational inference.

:func:`fit` maximizes a variational bound :math:`\\mathcal{L}(\\theta, \\phi) = \\sum_{i=1}^N
\\mathcal{L}_i` (the ELBO, or an importance-weighted bound) by minibatch stochastic gradient
ascent. A minibatch :math:`B \\subset \\{1..N\\}` gives the unbiased estimate

.. math::

    \\widehat{\\mathcal{L}} = \\frac{N}{|B|} \\sum_{i \\in B} \\widehat{\\mathcal{L}}_i ,

whose negative is the loss handed to the optimizer (Robbins & Monro 1951; Hoffman et al.
2013, *Stochastic variational inference*, JMLR 14). The history reports the bound **per data
row**, :math:`\\frac{1}{N}\\sum_i \\widehat{\\mathcal{L}}_i` in nats (higher is better): a
lower bound on the average log-likelihood, never the log-likelihood itself.

Everything a statistician needs to trust a fit is built in: each fit has its own parameter
store (two fits never share a tensor), a seed makes CPU runs bit-for-bit reproducible, the
data are validated before the first step, a non-finite loss stops the fit with the epoch,
step, site and data row that produced it (parameters restored to their last finite values),
and a checkpoint file lets an interrupted fit resume exactly where it stopped.

The package is ``pyro_lvm.inference.training``; the function is re-exported as
``pyro_lvm.fit`` and ``pyro_lvm.inference.fit``. Modules: :mod:`.loop` (:func:`fit` and the
epoch loop), :mod:`.step` (one optimizer step,
objectives, optimizer), :mod:`.state` (:class:`FitResult`, :class:`FitState`),
:mod:`.callbacks` (:class:`EarlyStopping`, :class:`KLWarmup`), :mod:`.checkpoint` and
:mod:`.forensics` (:class:`NonFiniteLossError`), :mod:`.row_checks` (Pyro's validation once
per training row), :mod:`.silent_modules` (PyroModule parameter statements skipped in steps).
"""
from pyro_lvm.inference.training.callbacks import EarlyStopping, KLWarmup, linear_warmup
from pyro_lvm.inference.training.forensics import NonFiniteLossError
from pyro_lvm.inference.training.loop import fit
from pyro_lvm.inference.training.state import HISTORY_COLUMNS, FitResult, FitState, StopFit
from pyro_lvm.inference.training.step import default_optimizer

__all__ = [
    "fit",
    "default_optimizer",
    "FitResult",
    "FitState",
    "StopFit",
    "EarlyStopping",
    "KLWarmup",
    "linear_warmup",
    "NonFiniteLossError",
    "HISTORY_COLUMNS",
]
