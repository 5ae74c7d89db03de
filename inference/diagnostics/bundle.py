"""All diagnostics in one call: :func:`diagnose` and its :class:`Diagnostics`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import pandas as pd


from pyro_lvm.inference.diagnostics.amortization import amortization_gap
from pyro_lvm.inference.diagnostics.importance import ImportanceDiagnostics, importance_diagnostics
from pyro_lvm.inference.diagnostics.latent import LatentUsage, latent_usage
from pyro_lvm.inference.diagnostics.predictive import posterior_predictive_check


@dataclass
class Diagnostics:
    """Everything :func:`diagnose` computed; parts that were not requested are None."""

    importance: Optional[ImportanceDiagnostics] = None
    latent: Optional[LatentUsage] = None
    predictive: Optional[pd.DataFrame] = None
    amortization: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, float]:
        """Flat ``name -> float`` for a metrics JSON (k-hat, ESS, active units, KL, PPC, gap)."""
        out: Dict[str, float] = {}
        if self.importance is not None:
            out.update(self.importance.to_dict())
        if self.latent is not None:
            out.update(self.latent.to_dict())
        if self.predictive is not None:
            p_two = self.predictive["p_two_sided"].to_numpy(dtype=float)
            out.update({
                "ppc_num_statistics": float(len(self.predictive)),
                "ppc_num_extreme": float(self.predictive["extreme"].sum()),
                "ppc_fraction_extreme": float(self.predictive["extreme"].mean()),
                "ppc_min_p_two_sided": float(np.nanmin(p_two)) if np.isfinite(p_two).any()
                else float("nan"),
            })
        if self.amortization is not None:
            out.update({
                "amortization_gap": self.amortization["mean_gap"],
                "amortization_gap_se": self.amortization["se"],
                "amortization_gap_mc_se": self.amortization["mc_se"],
            })
        return out

    def summary(self) -> str:
        lines = []
        if self.importance is not None:
            lines.append(self.importance.summary())
        if self.latent is not None:
            lines.append(self.latent.summary())
        if self.predictive is not None:
            table = self.predictive
            source = {"prior": "the fitted marginal p(x)",
                      "posterior": "p(x|z) with z from the guide"}.get(table.attrs.get("kind"), "?")
            lines.append(
                f"Predictive check with {table.attrs.get('num_replicates', '?')} replicates from "
                f"{source}: {int(table['extreme'].sum())} "
                f"of {len(table)} statistics extreme (two-sided p < "
                f"{table.attrs.get('extreme', float('nan')):g}; about "
                f"{table.attrs.get('extreme', 0) * len(table):.1f} expected by chance)"
                + (": " + ", ".join(f"{s} {f}" for s, f in
                                    table.loc[table["extreme"], ["statistic", "feature"]]
                                    .head(8).itertuples(index=False))
                   if table["extreme"].any() else "") + ".")
        if self.amortization is not None:
            gap = self.amortization
            lines.append(
                f"Amortization gap on {gap['num_rows']} rows: ELBO(local {gap['covariance']} "
                f"Gaussian) - ELBO(amortized) = {gap['mean_gap']:.4g} nats per row "
                f"(se {gap['se']:.2g}, Monte Carlo se {gap['mc_se']:.2g}).")
        return "\n".join(lines)


def diagnose(pair, data, *, num_samples: int = 1000, include_predictive: bool = True,
             predictive_kind: str = "prior", num_replicates: int = 100,
             include_amortization_gap: bool = False,
             amortization_kwargs: Optional[Dict[str, Any]] = None, mask=None, device="auto",
             seed: int = 0, batch_size: Optional[int] = None, progress: Optional[bool] = None,
             guide=None, param_state=None) -> Diagnostics:
    """Run the diagnostics of this module on one pair and data set.

    :func:`importance_diagnostics` (``num_samples`` per row), :func:`latent_usage`,
    :func:`posterior_predictive_check` (``include_predictive``) and
    :func:`amortization_gap` (``include_amortization_gap``, with ``amortization_kwargs``;
    off by default because it optimizes a guide per row). All share ``seed``, ``device``,
    ``mask`` and ``guide``.

    Returns
    -------
    Diagnostics
        ``to_dict()`` gives flat floats for a metrics file, ``summary()`` a paragraph.
    """
    common = dict(mask=mask, device=device, seed=seed, progress=progress, guide=guide,
                  param_state=param_state)
    result = Diagnostics()
    result.importance = importance_diagnostics(pair, data, num_samples, batch_size=batch_size,
                                               **common)
    result.latent = latent_usage(pair, data, batch_size=batch_size, **common)
    if include_predictive:
        result.predictive = posterior_predictive_check(pair, data, kind=predictive_kind,
                                                       num_replicates=num_replicates, **common)
    if include_amortization_gap:
        result.amortization = amortization_gap(pair, data, **{**common,
                                                              **(amortization_kwargs or {})})
    return result


