"""Observation models :math:`\\Phi(x \\mid \\eta)` of a deep latent variable model, where
:math:`\\eta = f_\\theta(z)` is the decoder output. All factorise over the ``p`` data
coordinates,

.. math:: \\log p_\\theta(x \\mid z) = \\sum_{j=1}^p m_j \\log \\Phi_j(x_j \\mid \\eta_j(z)),

with :math:`m_j \\in \\{0, 1\\}` the observed-entry mask (all ones when no mask is given), so
missing entries simply drop out.

* :class:`Bernoulli` -- :math:`x_j \\in \\{0,1\\}`, :math:`\\Phi_j = \\mathrm{Bernoulli}(\\sigma(\\eta_j))`.
* :class:`Gaussian` -- :math:`x_j \\mid z \\sim \\mathcal{N}(\\mu_j(z), \\sigma_j^2)` with
  :math:`\\sigma_j = \\sigma_{\\min} + \\operatorname{softplus}(\\rho_j)`, :math:`\\rho_j` a learnable
  per-dimension parameter or a decoder output. The floor :math:`\\sigma_{\\min} > 0` matters:
  Mattei & Frellsen (2018) show that the likelihood of a DLVM with an unconstrained Gaussian
  observation model is unbounded -- a decoder can put a mean exactly on one training point
  and let its variance go to zero -- so maximum likelihood (and the ELBO, which is below it)
  is ill-posed. With the floor, :math:`\\log p(x\\mid z) \\le -p\\,(\\log\\sigma_{\\min} +
  \\tfrac12\\log 2\\pi)` for every :math:`z`, hence also for :math:`\\log p(x)` and every bound on it.
* :class:`StudentT` -- :math:`x_j \\mid z \\sim t_{\\nu_j(z)}(\\mu_j(z), \\sigma_j(z))`, the robust
  observation model of Takahashi et al. (2018), with loc, scale and degrees of freedom all
  decoder outputs; the scale is floored as above (the Student-t density at its mode is
  also :math:`\\propto 1/\\sigma`) and :math:`\\nu = \\nu_{lo} + (\\nu_{hi} - \\nu_{lo})\\,
  \\operatorname{sigmoid}(\\eta)` is kept in a bounded interval, see :class:`StudentT`.

The decoder output for a likelihood with ``k = params_per_dim`` parameters per coordinate has
width ``k * p``, laid out as ``k`` consecutive blocks of ``p`` (block ``i`` = parameter ``i`` of
every coordinate). :meth:`Likelihood.distribution` returns a distribution with batch shape
``[..., p]``; the model applies ``.mask(mask).to_event(1)``.

References
----------
Mattei, P.-A. & Frellsen, J. (2018). Leveraging the exact likelihood of deep latent variable
models. NeurIPS.
Takahashi, H., Iwata, T., Yamanaka, Y., Yamada, M. & Yagi, S. (2018). Student-t variational
autoencoder for robust density estimation. IJCAI.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from .distributions import BinaryBernoulli
from .priors import inverse_softplus
from .validation import check_binary, check_counts

__all__ = ["Likelihood", "BinaryBernoulli", "Bernoulli", "Gaussian", "StudentT", "make_likelihood",
           "LIKELIHOOD_NAMES", "DEFAULT_SCALE_FLOOR", "DEFAULT_DF_BOUNDS",
           "Poisson", "NegativeBinomial", "Binomial", "Categorical", "OneHotGroups",
           "DEFAULT_DISPERSION_BOUNDS"]

#: Default lower bound on Gaussian / Student-t scales. For data on a unit scale
#: (standardized columns) it caps the log density at ``-log(1e-3) - log(2 pi)/2 = 5.99``
#: nats per coordinate: far above any well-fitted model, yet finite (see module docstring).
DEFAULT_SCALE_FLOOR = 1e-3

#: Default interval for Student-t degrees of freedom. Below: nu > 2 keeps the variance
#: finite (and the mean, used by :meth:`Likelihood.mean`, defined). Above: the float32
#: log-density involves ``lgamma((nu+1)/2) - lgamma(nu/2)``, a difference of two numbers of
#: size ~ (nu/2) log(nu/2), so its rounding error grows with nu: measured against float64,
#: ~1e-5 nat per coordinate at nu = 100, ~5e-3 at 1e4, ~0.1 at 1e6 and ~1 at 1e7. Beyond
#: nu ~ 100 a Student-t is practically Gaussian anyway.
DEFAULT_DF_BOUNDS = (2.0, 100.0)

#: Accepted names (and aliases) for :func:`make_likelihood`.
LIKELIHOOD_NAMES = {
    "bernoulli": "bernoulli", "binary": "bernoulli",
    "gaussian": "gaussian", "normal": "gaussian",
    "studentt": "studentt", "student_t": "studentt", "student-t": "studentt", "t": "studentt",
    "poisson": "poisson",
    "negbinomial": "negbinomial", "negative_binomial": "negbinomial", "nb": "negbinomial",
    "binomial": "binomial",
    "categorical": "categorical",
}


def _check_floor(scale_floor) -> float:
    try:
        floor = float(scale_floor)
    except (TypeError, ValueError):
        raise ValueError(f"scale_floor must be a number >= 0, got {scale_floor!r}") from None
    if not (floor >= 0 and math.isfinite(floor)):
        raise ValueError(f"scale_floor must be a finite number >= 0, got {scale_floor!r}")
    return floor


class Likelihood(PyroModule):
    """Base class of factorised observation models.

    Parameters
    ----------
    data_dim : int, optional
        Number of data coordinates ``p``. May be left out and set later by :meth:`bind`
        (the DLVM does this), except where a parameter's size depends on it.

    Attributes
    ----------
    params_per_dim : int
        Decoder outputs per data coordinate.
    """

    params_per_dim: int = 1
    #: Short name used in reports and configs.
    name: str = "likelihood"
    #: Whether integer arrays of any value are data for this likelihood (counts); the others
    #: accept integer arrays only when they are 0/1.
    integer_data: bool = False

    def __init__(self, data_dim: Optional[int] = None):
        super().__init__()
        self.data_dim = None
        self._init_data_dim = data_dim  # bound by subclasses once their options are set

    def _finish_init(self) -> None:
        data_dim = self.__dict__.pop("_init_data_dim", None)
        if data_dim is not None:
            self.bind(data_dim)

    def bind(self, data_dim: int) -> "Likelihood":
        """Fix the data dimension (creating per-dimension parameters); idempotent."""
        if isinstance(data_dim, bool) or not isinstance(data_dim, int) or data_dim < 1:
            raise ValueError(f"data_dim must be a positive integer, got {data_dim!r}")
        if self.data_dim is not None and self.data_dim != data_dim:
            raise ValueError(
                f"this {type(self).__name__} likelihood was built for data_dim={self.data_dim}, "
                f"not {data_dim}"
            )
        if self.data_dim is None:
            self.data_dim = data_dim
            self._build(data_dim)
        return self

    def _build(self, data_dim: int) -> None:
        """Create parameters whose size depends on ``data_dim`` (hook)."""

    @property
    def output_dim(self) -> int:
        """Width of the decoder output this likelihood expects, ``params_per_dim * p``."""
        if self.data_dim is None:
            raise ValueError(f"{type(self).__name__}: data_dim is not set; call .bind(data_dim)")
        return self.params_per_dim * self.data_dim

    def split(self, decoder_output: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Split ``[..., k p]`` into ``k`` tensors ``[..., p]``."""
        k = self.params_per_dim
        width = decoder_output.shape[-1]
        if width % k or (self.data_dim is not None and width != k * self.data_dim):
            expected = f"{k} * data_dim = {k * self.data_dim}" if self.data_dim else f"a multiple of {k}"
            raise ValueError(
                f"{type(self).__name__} likelihood got a decoder output of width {width}; "
                f"expected {expected}"
            )
        if k == 1:  # no split: its backward would concatenate a full-size gradient copy
            return (decoder_output,)
        return tuple(decoder_output.split(width // k, dim=-1))

    def distribution(self, decoder_output: torch.Tensor) -> dist.TorchDistribution:
        """:math:`\\Phi(\\cdot \\mid \\eta)` with batch shape ``decoder_output.shape[:-1] + [p]``."""
        raise NotImplementedError

    def mean(self, decoder_output: torch.Tensor) -> torch.Tensor:
        """:math:`E[x \\mid z]`, shape ``[..., p]``."""
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, decoder_output: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:math:`\\sum_{j \\text{ observed}} \\log \\Phi(x_j \\mid \\eta_j)` for ``x`` ``[..., p]``
        (broadcast against ``decoder_output`` ``[..., k p]``); returns ``[...]``.

        The same numbers as scoring ``distribution(decoder_output).mask(mask).to_event(1)`` in a
        Pyro model (missing entries contribute 0), without Pyro."""
        if mask is None:  # the distribution's own event sum (fused for BinaryBernoulli)
            return self.distribution(decoder_output).to_event(1).log_prob(x)
        log_p = self.distribution(decoder_output).log_prob(x)
        return torch.where(mask, log_p, log_p.new_zeros(())).sum(-1)

    def check_data(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Raise ValueError if ``x`` is outside this model's support (finite values and shape
        are checked by :func:`models.validation.check_data`)."""

    def log_density_upper_bound(self) -> float:
        """Supremum over decoder outputs of :math:`\\log p(x \\mid z)` for one fully observed
        row (``inf`` when unbounded)."""
        return math.inf


class Bernoulli(Likelihood):
    """:math:`x_j \\mid z \\sim \\mathrm{Bernoulli}(\\operatorname{sigmoid}(\\eta_j))`, decoder outputs logits.

    Parameters
    ----------
    allow_fractional : bool
        False (default): data must be exactly 0 or 1 (:meth:`check_data` raises otherwise).
        True: values in [0, 1] are accepted and scored with the same formula,
        :math:`x \\log \\pi + (1-x) \\log(1-\\pi)` (binary cross-entropy). For fractional ``x``
        this is *not* a normalised density over [0, 1] (the continuous Bernoulli of
        Loaiza-Ganem & Cunningham 2019 would be), so the resulting "log-likelihoods" are only
        comparable between models scored the same way. Pyro's support check is switched off
        for this case (``validate_args=False``), since it would reject non-binary values.
    """

    params_per_dim = 1
    name = "bernoulli"

    def __init__(self, allow_fractional: bool = False, data_dim: Optional[int] = None):
        super().__init__(data_dim)
        self.allow_fractional = bool(allow_fractional)
        self._finish_init()

    def distribution(self, decoder_output):
        (logits,) = self.split(decoder_output)
        if self.allow_fractional:
            return dist.Bernoulli(logits=logits, validate_args=False)
        return BinaryBernoulli(logits=logits)

    def mean(self, decoder_output):
        (logits,) = self.split(decoder_output)
        return torch.sigmoid(logits)

    def check_data(self, x, mask=None):
        check_binary(x, name="data", allow_fractional=self.allow_fractional, mask=mask)

    def log_density_upper_bound(self) -> float:
        return 0.0

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, allow_fractional={self.allow_fractional}"


class Gaussian(Likelihood):
    """:math:`x_j \\mid z \\sim \\mathcal{N}(\\mu_j(z), \\sigma_j^2)` with a floored scale.

    Parameters
    ----------
    scale : {"per_dimension", "decoder", "fixed"}
        ``"per_dimension"``: :math:`\\sigma_j = \\sigma_{\\min} + \\operatorname{softplus}(\\rho_j)`
        with a learnable :math:`\\rho \\in \\mathbb{R}^p` (decoder outputs the mean only;
        needs ``data_dim``). ``"decoder"``: :math:`\\rho_j(z)` is a second decoder output
        (heteroscedastic). ``"fixed"``: :math:`\\sigma_j = ` ``fixed_scale``, not learned.
    scale_floor : float
        :math:`\\sigma_{\\min}` (default :data:`DEFAULT_SCALE_FLOOR` = 1e-3). It bounds the
        likelihood above, which Mattei & Frellsen (2018) show is otherwise unbounded (see
        the module docstring). Choose it relative to the data's resolution (e.g. the
        measurement precision); 0 reproduces the ill-posed unconstrained model.
    fixed_scale : float or tensor ``[p]``
        The scale for ``scale="fixed"``.
    init_scale : float
        Initial :math:`\\sigma_j` for ``scale="per_dimension"``.
    """

    name = "gaussian"
    SCALE_MODES = ("per_dimension", "decoder", "fixed")

    def __init__(self, scale: str = "per_dimension", scale_floor: float = DEFAULT_SCALE_FLOOR,
                 fixed_scale: Union[float, torch.Tensor] = 1.0, init_scale: float = 1.0,
                 data_dim: Optional[int] = None):
        super().__init__(data_dim)
        if scale not in self.SCALE_MODES:
            raise ValueError(f"Gaussian scale must be one of {self.SCALE_MODES}, got {scale!r}")
        self.scale_mode = scale
        self.params_per_dim = 2 if scale == "decoder" else 1
        self.scale_floor = _check_floor(scale_floor)
        self._fixed_scale = torch.as_tensor(fixed_scale, dtype=torch.get_default_dtype())
        if scale == "fixed" and not bool((self._fixed_scale > 0).all()):
            raise ValueError(f"fixed_scale must be positive, got {fixed_scale!r}")
        self.init_scale = float(init_scale)
        #: a learned scale makes a constant training column's likelihood unbounded
        self.learns_scale = scale != "fixed"
        if scale == "per_dimension" and not (self.init_scale > self.scale_floor):
            raise ValueError(
                f"init_scale={init_scale!r} must exceed scale_floor={self.scale_floor}"
            )
        self._finish_init()

    def _build(self, data_dim: int) -> None:
        if self.scale_mode == "per_dimension":
            self.raw_scale = nn.Parameter(
                inverse_softplus(torch.full((data_dim,), self.init_scale - self.scale_floor))
            )
        elif self.scale_mode == "fixed":
            fixed = self._fixed_scale
            if fixed.dim() > 1 or (fixed.dim() == 1 and fixed.shape[0] not in (1, data_dim)):
                raise ValueError(
                    f"fixed_scale must be a scalar or have {data_dim} entries, got shape "
                    f"{tuple(fixed.shape)}"
                )
            self.register_buffer("fixed_scale", fixed.expand(data_dim).clone())

    def distribution(self, decoder_output):
        loc, scale = self.loc_scale(decoder_output)
        return dist.Normal(loc, scale)

    def loc_scale(self, decoder_output) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and (floored) standard deviation, both ``[..., p]``."""
        if self.data_dim is None:
            raise ValueError("Gaussian likelihood: data_dim is not set; call .bind(data_dim)")
        parts = self.split(decoder_output)
        loc = parts[0]
        if self.scale_mode == "decoder":
            scale = self.scale_floor + F.softplus(parts[1])
        elif self.scale_mode == "per_dimension":
            scale = (self.scale_floor + F.softplus(self.raw_scale)).expand_as(loc)
        else:
            scale = self.fixed_scale.expand_as(loc)
        return loc, scale

    def mean(self, decoder_output):
        return self.split(decoder_output)[0]

    def log_density_upper_bound(self) -> float:
        if self.data_dim is None:
            raise ValueError("Gaussian likelihood: data_dim is not set; call .bind(data_dim)")
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        if self.scale_mode == "fixed":
            return float(-(torch.log(self.fixed_scale) + half_log_2pi).sum())
        if self.scale_floor == 0:
            return math.inf
        return -self.data_dim * (math.log(self.scale_floor) + half_log_2pi)

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, scale={self.scale_mode!r}, scale_floor={self.scale_floor}"


class StudentT(Likelihood):
    """:math:`x_j \\mid z \\sim t_{\\nu_j(z)}(\\mu_j(z), \\sigma_j(z))` (Takahashi et al. 2018).

    The decoder outputs three blocks per coordinate: :math:`\\mu`, :math:`\\rho` and
    :math:`\\eta`, with :math:`\\sigma = \\sigma_{\\min} + \\operatorname{softplus}(\\rho)` and
    :math:`\\nu = \\nu_{lo} + (\\nu_{hi} - \\nu_{lo})\\operatorname{sigmoid}(\\eta)`.

    Parameters
    ----------
    df_bounds : (float, float)
        :math:`(\\nu_{lo}, \\nu_{hi})`, default :data:`DEFAULT_DF_BOUNDS` = (2, 100): above 2
        the variance is finite and the mean (used for reconstructions) exists; the upper
        bound keeps the float32 log-density accurate (``lgamma`` cancellation, see
        :data:`DEFAULT_DF_BOUNDS`) and a t with 100 df is already nearly Gaussian.
    scale_floor : float
        :math:`\\sigma_{\\min}`, default 1e-3 (the t density at its mode also grows like
        :math:`1/\\sigma`, so the Mattei & Frellsen unboundedness applies here too).
    """

    params_per_dim = 3
    name = "studentt"

    def __init__(self, df_bounds: Sequence[float] = DEFAULT_DF_BOUNDS,
                 scale_floor: float = DEFAULT_SCALE_FLOOR, data_dim: Optional[int] = None):
        super().__init__(data_dim)
        try:
            lo, hi = (float(v) for v in df_bounds)
        except (TypeError, ValueError):
            raise ValueError(f"df_bounds must be a pair (low, high), got {df_bounds!r}") from None
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"df_bounds must satisfy 0 < low < high < inf, got {df_bounds!r}")
        self.df_bounds = (lo, hi)
        self.scale_floor = _check_floor(scale_floor)
        self.learns_scale = True
        self._finish_init()

    def params(self, decoder_output) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(df, loc, scale)``, each ``[..., p]``."""
        loc, raw_scale, raw_df = self.split(decoder_output)
        lo, hi = self.df_bounds
        df = lo + (hi - lo) * torch.sigmoid(raw_df)
        scale = self.scale_floor + F.softplus(raw_scale)
        return df, loc, scale

    def distribution(self, decoder_output):
        df, loc, scale = self.params(decoder_output)
        return dist.StudentT(df, loc, scale)

    def mean(self, decoder_output):
        # loc is the mean when nu > 1 (always, with the default bounds) and the median always.
        return self.split(decoder_output)[0]

    def log_density_upper_bound(self) -> float:
        if self.data_dim is None:
            raise ValueError("StudentT likelihood: data_dim is not set; call .bind(data_dim)")
        if self.scale_floor == 0:
            return math.inf
        # The density at the mode, Gamma((nu+1)/2) / (Gamma(nu/2) sqrt(nu pi) sigma), increases
        # with nu, so its supremum is at nu_hi and sigma_min.
        nu = self.df_bounds[1]
        per_dim = (math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)
                   - 0.5 * math.log(nu * math.pi) - math.log(self.scale_floor))
        return self.data_dim * per_dim

    def extra_repr(self) -> str:
        return (f"data_dim={self.data_dim}, df_bounds={self.df_bounds}, "
                f"scale_floor={self.scale_floor}")


def make_likelihood(spec: Union[str, Likelihood], data_dim: Optional[int] = None,
                    **options) -> Likelihood:
    """Build an observation model from a name (``"bernoulli"``, ``"gaussian"``, ``"studentt"``,
    ``"poisson"``, ``"negbinomial"``, ``"binomial"`` (needs ``total_count=``),
    ``"categorical"`` (needs ``groups=``); aliases in :data:`LIKELIHOOD_NAMES`) with
    constructor ``options``, or check and bind a given :class:`Likelihood` instance to
    ``data_dim``."""
    if isinstance(spec, Likelihood):
        if options:
            raise ValueError(f"options {sorted(options)} cannot be applied to a likelihood instance")
        return spec.bind(data_dim) if data_dim is not None else spec
    if not isinstance(spec, str) or spec.lower() not in LIKELIHOOD_NAMES:
        raise ValueError(
            f"unknown likelihood {spec!r}; use one of {sorted(set(LIKELIHOOD_NAMES))} or a "
            f"models.likelihoods.Likelihood instance"
        )
    cls = {"bernoulli": Bernoulli, "gaussian": Gaussian, "studentt": StudentT,
           "poisson": Poisson, "negbinomial": NegativeBinomial, "binomial": Binomial,
           "categorical": Categorical}[LIKELIHOOD_NAMES[spec.lower()]]
    try:
        return cls(data_dim=data_dim, **options)
    except TypeError as exc:
        raise ValueError(f"bad option for the {cls.__name__} likelihood: {exc}") from None


# ====================================================================== count and category models
#: Default interval for the negative binomial's inverse dispersion :math:`r` (``total_count``
#: in torch): the variance is :math:`\\mu + \\mu^2 / r`. Below: as :math:`r \\to 0` all mass
#: goes to 0 and ``lgamma(r)`` blows up. Above: the float32 log-density involves
#: ``lgamma(x + r) - lgamma(r)``, whose rounding error grows like :math:`r \\log r` times the
#: float32 epsilon (about 4e-4 nat at r = 1e3); at r = 1000 a negative binomial with mean 16
#: has variance 16.26, practically Poisson.
DEFAULT_DISPERSION_BOUNDS = (1e-2, 1e3)


class _DiscreteLikelihood(Likelihood):
    """Observation models of counts or categories: a log probability, at most 0 per row."""

    integer_data = True

    def log_density_upper_bound(self) -> float:
        return 0.0


class Poisson(_DiscreteLikelihood):
    """:math:`x_j \\mid z \\sim \\mathrm{Poisson}(\\exp \\eta_j)`: the decoder outputs log-rates.

    :math:`\\log \\Phi_j = x_j \\eta_j - e^{\\eta_j} - \\log x_j!`. The data must be
    non-negative integers (:meth:`check_data` names the rows and columns that are not).
    """

    params_per_dim = 1
    name = "poisson"

    def __init__(self, data_dim: Optional[int] = None):
        super().__init__(data_dim)
        self._finish_init()

    def distribution(self, decoder_output):
        (log_rate,) = self.split(decoder_output)
        return dist.Poisson(log_rate.exp())

    def mean(self, decoder_output):
        return self.split(decoder_output)[0].exp()

    def check_data(self, x, mask=None):
        check_counts(x, mask=mask, model="Poisson")

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}"


class NegativeBinomial(_DiscreteLikelihood):
    """:math:`x_j \\mid z \\sim \\mathrm{NB}(\\mu_j(z), r_j)` with mean :math:`\\mu_j = e^{\\eta_j}`
    and variance :math:`\\mu_j + \\mu_j^2 / r_j` (the mean / inverse-dispersion form used for
    counts by scVI, Lopez et al. 2018):

    .. math:: \\Phi_j(x) = \\frac{\\Gamma(x + r)}{x!\\,\\Gamma(r)}
              \\Big(\\frac{r}{r + \\mu}\\Big)^r \\Big(\\frac{\\mu}{r + \\mu}\\Big)^x,

    scored as torch's ``NegativeBinomial(total_count=r, logits=log mu - log r)``.

    Parameters
    ----------
    dispersion : {"per_dimension", "decoder"}
        ``"per_dimension"``: one learnable :math:`r_j` per column (scVI's "gene" dispersion);
        ``"decoder"``: :math:`r_j(z)` is a second decoder output.
    dispersion_bounds : (float, float)
        :math:`r = r_{lo} + (r_{hi} - r_{lo})\\,\\operatorname{sigmoid}(\\rho)`, default
        :data:`DEFAULT_DISPERSION_BOUNDS` (why bounded: see there).
    init_dispersion : float
        Initial :math:`r_j` for ``"per_dimension"`` (default 10).

    References
    ----------
    Lopez, R., Regier, J., Cole, M. B., Jordan, M. I. & Yosef, N. (2018). Deep generative
    modeling for single-cell transcriptomics. Nature Methods 15, 1053-1058.
    """

    name = "negbinomial"
    DISPERSION_MODES = ("per_dimension", "decoder")

    def __init__(self, dispersion: str = "per_dimension",
                 dispersion_bounds: Sequence[float] = DEFAULT_DISPERSION_BOUNDS,
                 init_dispersion: float = 10.0, data_dim: Optional[int] = None):
        super().__init__(data_dim)
        if dispersion not in self.DISPERSION_MODES:
            raise ValueError(f"negative binomial dispersion must be one of "
                             f"{self.DISPERSION_MODES}, got {dispersion!r}")
        try:
            lo, hi = (float(v) for v in dispersion_bounds)
        except (TypeError, ValueError):
            raise ValueError(f"dispersion_bounds must be a pair (low, high), got "
                             f"{dispersion_bounds!r}") from None
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"dispersion_bounds must satisfy 0 < low < high < inf, got "
                             f"{dispersion_bounds!r}")
        if dispersion == "per_dimension" and not (lo < init_dispersion < hi):
            raise ValueError(f"init_dispersion={init_dispersion!r} must lie strictly inside "
                             f"dispersion_bounds={dispersion_bounds!r}")
        self.dispersion_mode = dispersion
        self.dispersion_bounds = (lo, hi)
        self.init_dispersion = float(init_dispersion)
        self.params_per_dim = 2 if dispersion == "decoder" else 1
        self._finish_init()

    def _build(self, data_dim: int) -> None:
        if self.dispersion_mode == "per_dimension":
            lo, hi = self.dispersion_bounds
            u = (self.init_dispersion - lo) / (hi - lo)
            self.raw_dispersion = nn.Parameter(torch.full((data_dim,), math.log(u / (1 - u))))

    def params(self, decoder_output) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mean, r)``, each ``[..., p]``."""
        if self.data_dim is None:
            raise ValueError("NegativeBinomial likelihood: data_dim is not set; call .bind(data_dim)")
        parts = self.split(decoder_output)
        raw = parts[1] if self.dispersion_mode == "decoder" else self.raw_dispersion
        lo, hi = self.dispersion_bounds
        r = lo + (hi - lo) * torch.sigmoid(raw)
        return parts[0].exp(), r.expand_as(parts[0])

    def distribution(self, decoder_output):
        log_mean = self.split(decoder_output)[0]
        _, r = self.params(decoder_output)
        return dist.NegativeBinomial(total_count=r, logits=log_mean - r.log())

    def mean(self, decoder_output):
        return self.split(decoder_output)[0].exp()

    def check_data(self, x, mask=None):
        check_counts(x, mask=mask, model="negative binomial")

    def extra_repr(self) -> str:
        return (f"data_dim={self.data_dim}, dispersion={self.dispersion_mode!r}, "
                f"dispersion_bounds={self.dispersion_bounds}")


class Binomial(_DiscreteLikelihood):
    """:math:`x_j \\mid z \\sim \\mathrm{Binomial}(n_j, \\operatorname{sigmoid}(\\eta_j))` with a
    known number of trials :math:`n_j` (``total_count``); the decoder outputs logits.

    The 8x8 digits' pixel intensities 0..16 are counts of 16 (each pixel counts the inked
    cells of a 4x4 block of the original 32x32 bitmap), so ``total_count=16`` fits them.

    Parameters
    ----------
    total_count : int or sequence of int
        :math:`n`, one for every column or one per column (required).
    """

    params_per_dim = 1
    name = "binomial"

    def __init__(self, total_count=None, data_dim: Optional[int] = None):
        super().__init__(data_dim)
        if total_count is None:
            raise ValueError("the binomial likelihood needs total_count, the known number of "
                             "trials (e.g. likelihood_options={'total_count': 16} for digits)")
        n = torch.as_tensor(total_count, dtype=torch.get_default_dtype())
        if n.dim() > 1 or n.numel() < 1 or not bool(((n >= 1) & (n == n.round())).all()):
            raise ValueError(f"total_count must be a positive integer or one per column, got "
                             f"{total_count!r}")
        self._total_count = n
        self._finish_init()

    def _build(self, data_dim: int) -> None:
        n = self._total_count
        if n.dim() == 1 and n.shape[0] not in (1, data_dim):
            raise ValueError(f"total_count must be a scalar or have {data_dim} entries, got "
                             f"{n.shape[0]}")
        self.register_buffer("total_count", n.expand(data_dim).clone())

    def distribution(self, decoder_output):
        (logits,) = self.split(decoder_output)
        return dist.Binomial(total_count=self.total_count.to(logits.dtype).expand_as(logits),
                             logits=logits)

    def mean(self, decoder_output):
        return self.total_count * torch.sigmoid(self.split(decoder_output)[0])

    def check_data(self, x, mask=None):
        check_counts(x, mask=mask, total_count=self.total_count, model="binomial")

    def extra_repr(self) -> str:
        n = self.total_count.unique().tolist() if self.data_dim else None
        return f"data_dim={self.data_dim}, total_count={n[0] if n and len(n) == 1 else n}"


class OneHotGroups(dist.TorchDistribution):
    """Independent categorical variables, each written as a group of one-hot columns: batch
    shape ``[..., p]`` (one factor per column) so that ``.mask(mask).to_event(1)`` works as for
    the other observation models.

    For column :math:`j` in group :math:`g(j)`, ``log_prob(x)[..., j]`` is
    :math:`x_j \\log \\pi_j` with :math:`\\pi = \\operatorname{softmax}` of the logits within
    the group; summed over a group's columns this is the log probability of its one-hot row.

    Parameters
    ----------
    logits : tensor ``[..., p]``
    group_index : LongTensor ``[p]``
        The group of each column, 0..G-1.
    num_groups : int
    """

    arg_constraints = {"logits": dist.constraints.real}
    support = dist.constraints.boolean

    def __init__(self, logits: torch.Tensor, group_index: torch.Tensor, num_groups: int,
                 validate_args=None):
        self.logits = logits
        self.group_index = group_index
        self.num_groups = int(num_groups)
        super().__init__(logits.shape, torch.Size(), validate_args=validate_args)

    def _group_reduce(self, values: torch.Tensor, how: str) -> torch.Tensor:
        """Per-group ``"amax"`` or ``"sum"`` of ``values`` ``[..., p]``, giving ``[..., G]``."""
        index = self.group_index.expand(values.shape)
        shape = values.shape[:-1] + (self.num_groups,)
        if how == "sum":
            return values.new_zeros(shape).scatter_add(-1, index, values)
        return values.new_full(shape, -math.inf).scatter_reduce(-1, index, values, "amax")

    @property
    def log_probs(self) -> torch.Tensor:
        """:math:`\\log \\pi_j`, the log-softmax of the logits within each group, ``[..., p]``."""
        shift = self._group_reduce(self.logits.detach(), "amax")[..., self.group_index]
        shifted = self.logits - shift
        log_norm = self._group_reduce(shifted.exp(), "sum").log()[..., self.group_index]
        return shifted - log_norm

    @property
    def mean(self) -> torch.Tensor:
        return self.log_probs.exp()

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(OneHotGroups, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape)
        new.group_index, new.num_groups = self.group_index, self.num_groups
        super(OneHotGroups, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return value * self.log_probs

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """One category per group (Gumbel-max), returned one-hot, ``sample_shape + [..., p]``."""
        with torch.no_grad():
            log_probs = self.log_probs.expand(torch.Size(sample_shape) + self.batch_shape)
            u = torch.rand_like(log_probs).clamp(min=torch.finfo(log_probs.dtype).tiny)
            perturbed = log_probs - (-u.log()).log()
            best = self._group_reduce(perturbed, "amax")[..., self.group_index]
            return (perturbed == best).to(log_probs.dtype)


def _group_index(groups, data_dim: int) -> Tuple[torch.Tensor, int]:
    """Column -> group map from sizes of consecutive blocks or lists of column indices."""
    groups = list(groups)
    if not groups:
        raise ValueError("categorical groups must not be empty")
    if all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
        if any(g < 2 for g in groups) or sum(groups) != data_dim:
            raise ValueError(f"categorical group sizes {groups} must each be >= 2 and sum to "
                             f"data_dim={data_dim}")
        index = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(groups))
        return index, len(groups)
    index = torch.full((data_dim,), -1, dtype=torch.long)
    for g, cols in enumerate(groups):
        try:
            cols = [int(c) for c in cols]
        except (TypeError, ValueError):
            raise ValueError(f"categorical groups must be sizes (ints) or lists of column "
                             f"indices, got {groups!r}") from None
        if len(cols) < 2:
            raise ValueError(f"categorical group {g} has {len(cols)} column(s); a group needs >= 2")
        for c in cols:
            if not 0 <= c < data_dim:
                raise ValueError(f"categorical group {g} names column {c}, outside 0..{data_dim - 1}")
            if index[c] >= 0:
                raise ValueError(f"column {c} is in categorical groups {int(index[c])} and {g}")
            index[c] = g
    missing = (index < 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"columns {missing} are in no categorical group; every column must be "
                         f"in exactly one")
    return index, len(groups)


class Categorical(_DiscreteLikelihood):
    """A product of categorical (one-draw multinomial) variables, each coded as a group of
    one-hot columns: for group :math:`g` with columns :math:`C_g`,

    .. math:: \\log \\Phi_g(x) = \\sum_{j \\in C_g} x_j \\log \\operatorname{softmax}_{C_g}(\\eta)_j,

    the decoder giving one logit per column. A mask must keep or drop whole groups.

    Parameters
    ----------
    groups : sequence of int, or sequence of sequences of int
        Sizes of consecutive column blocks (``[3, 2]``: columns 0-2 and 3-4), or the column
        indices of each group; every column in exactly one group of at least 2 columns.
        ``pandas.get_dummies`` of categorical columns gives this layout.
    """

    params_per_dim = 1
    name = "categorical"

    def __init__(self, groups=None, data_dim: Optional[int] = None):
        super().__init__(data_dim)
        if groups is None:
            raise ValueError("the categorical likelihood needs groups: the sizes of consecutive "
                             "one-hot column blocks or the column indices of each group")
        self._groups = groups
        self._finish_init()

    def _build(self, data_dim: int) -> None:
        index, self.num_groups = _group_index(self._groups, data_dim)
        self.register_buffer("group_index", index)

    def distribution(self, decoder_output):
        (logits,) = self.split(decoder_output)
        return OneHotGroups(logits, self.group_index, self.num_groups)

    def mean(self, decoder_output):
        return self.distribution(decoder_output).mean

    def check_data(self, x, mask=None):
        check_binary(x, name="data", mask=mask)
        index = self.group_index.to(x.device)
        if mask is not None:
            observed = mask.to(x.dtype)
            per_group = OneHotGroups(observed, index, self.num_groups)._group_reduce(observed, "sum")
            sizes = torch.bincount(index, minlength=self.num_groups).to(x.dtype)
            partial = (per_group > 0) & (per_group < sizes)
            if bool(partial.any()):
                r, g = partial.nonzero()[0].tolist()
                raise ValueError(
                    f"mask drops only part of categorical group {g} (columns "
                    f"{(index == g).nonzero().flatten().tolist()}) in row {r}; a category is "
                    f"observed or missing as a whole")
            x = x * observed
        counts = OneHotGroups(x, index, self.num_groups)._group_reduce(x, "sum")
        bad = counts != 1
        if mask is not None:
            bad &= per_group > 0
        if bool(bad.any()):
            rows, gs = bad.nonzero().T.tolist()
            where = ", ".join(f"(row {r}, columns {(index == g).nonzero().flatten().tolist()})"
                              for r, g in list(zip(rows, gs))[:5])
            raise ValueError(
                f"data has {len(rows)} categorical group(s) that are not one-hot (exactly one 1 "
                f"per group) at {where}; check the groups or the encoding")

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, num_groups={getattr(self, 'num_groups', None)}"
