"""Figures of a study report, each returned as a ``data:image/png;base64,...`` URI.

Every function draws on its own :class:`matplotlib.figure.Figure` with the Agg canvas (no
pyplot, so no global figure registry to leak into and no GUI backend is ever touched),
encodes it as PNG and releases it. A function returns ``None`` when it has nothing to draw
(no data), so the report can omit the section. Inputs are plain numpy arrays and pandas
tables; nothing here reads files.
"""
from __future__ import annotations

import base64
import io
import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from pyro_lvm.inference import reliability

__all__ = [
    "KHAT_BAD",
    "level_colors",
    "figure_to_data_uri",
    "image_mosaic",
    "khat_distribution",
    "khat_regions",
    "latent_scatter",
    "latent_usage",
    "learning_curves",
    "metric_by_factor",
    "pca_projection",
    "prior_vs_aggregate_posterior",
    "reconstructions",
    "samples_grid",
]

#: Pareto k-hat above which no practical number of draws helps (Vehtari et al. 2024).
KHAT_BAD = reliability.KHAT_BAD
_DPI = 80
_PANEL = (3.6, 2.8)  # inches per facet
_MAX_COLS = 3


def figure_to_data_uri(fig: Figure) -> str:
    """Encode ``fig`` as a PNG data URI and release its canvas."""
    buffer = io.BytesIO()
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.print_png(buffer)
    fig.clear()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _facets(n: int, *, panel=_PANEL, max_cols: int = _MAX_COLS, sharey=False, sharex=False):
    cols = min(max_cols, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig = _new_figure(panel[0] * cols, panel[1] * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=sharex, sharey=sharey).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def level_colors(levels: Sequence[str]) -> dict[str, tuple]:
    """One colour per level of a factor (colour-blind safe), the same in every figure."""
    levels = list(dict.fromkeys(str(v) for v in levels))
    palette = sns.color_palette("colorblind", max(len(levels), 1))
    return dict(zip(levels, palette))


#: Line styles telling apart the levels of a second setting (e.g. the objective).
LINE_STYLES = ("-", "--", ":", "-.")
HATCHES = ("", "//", "..", "xx")


def _as_labels(values: pd.Series) -> pd.Series:
    """Category labels as plain strings; missing values become "—" (pandas' string dtype would
    keep them missing, which seaborn cannot place on a categorical axis)."""
    return values.map(lambda v: "—" if pd.isna(v) else (
        str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))).astype(object)


def _wrap(label: str, width: int = 42) -> str:
    """Panel titles are configuration labels; wrap long ones at their commas."""
    return textwrap.fill(str(label), width=width, break_long_words=False)


def _check_2d(array, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=float)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, columns], got shape {array.shape}")
    return array


# --------------------------------------------------------------------------- learning curves


def learning_curves(
    histories: Mapping[str, pd.DataFrame],
    panels: Mapping[str, str],
    colors: Mapping[str, tuple],
    legend: Mapping[str, str],
    *,
    ylabel: str = "objective per data row (nats)",
) -> str | None:
    """Train (solid) and validation (dashed) objective per epoch, one line per run.

    Parameters
    ----------
    histories : mapping run_id -> DataFrame
        ``history.csv`` of each run (columns ``epoch``, ``train_objective`` and optionally
        ``valid_objective``); rows are averaged per epoch, so per-step logs work too.
    panels : mapping run_id -> str
        The panel of each run (e.g. its objective: runs optimizing the same bound share one);
        panels share their y axis, so curves are comparable across them.
    colors : mapping run_id -> colour
        The colour of the level of the study's factor a run belongs to.
    legend : mapping run_id -> str
        The legend entry of the run's colour (its factor level; one entry per level).
    """
    usable = {rid: h for rid, h in histories.items()
              if h is not None and "train_objective" in h.columns and len(h) > 0}
    if not usable:
        return None
    names = list(dict.fromkeys(panels.get(rid, "") for rid in usable))
    fig, axes = _facets(len(names), panel=(4.2, 3.0), sharey=True)
    handles: dict[str, Line2D] = {}
    for ax, name in zip(axes, names):
        for rid in [r for r in usable if panels.get(r, "") == name]:
            h = usable[rid]
            x = "epoch" if "epoch" in h.columns else None
            cols = [c for c in ("train_objective", "valid_objective") if c in h.columns]
            per_epoch = (h.groupby(x)[cols].mean() if x else h[cols].reset_index(drop=True))
            color = colors.get(rid, "0.4")
            ax.plot(per_epoch.index, per_epoch["train_objective"], color=color, lw=1.2,
                    alpha=0.85)
            if "valid_objective" in per_epoch.columns and per_epoch["valid_objective"].notna().any():
                valid = per_epoch["valid_objective"].dropna()
                ax.plot(valid.index, valid, color=color, lw=1.0, ls="--", alpha=0.85)
            handles.setdefault(legend.get(rid, rid), Line2D([], [], color=color, lw=2))
        ax.set_title(_wrap(name), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel, fontsize=8)
    handles["train (solid)"] = Line2D([], [], color="0.3", lw=1.2)
    handles["validation (dashed)"] = Line2D([], [], color="0.3", lw=1.0, ls="--")
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)
    return figure_to_data_uri(fig)


# --------------------------------------------------------------------------- metric with error bars


def metric_by_factor(
    results: pd.DataFrame,
    metric: str,
    x: str,
    *,
    hue: str | None = None,
    palette: Mapping[str, tuple] | None = None,
    ylabel: str | None = None,
) -> str | None:
    """Mean of ``metric`` with ±1 standard error bars over seeds, per level of ``x`` and
    ``hue``; individual runs as faint dots in the same colour.

    ``results`` holds successful runs only (one row per run); seaborn's ``errorbar="se"`` is
    :math:`\\mathrm{sd}/\\sqrt n` over the runs of each point, the same standard error as
    :func:`reports.analysis.summarize`. ``palette`` maps levels of ``hue`` to colours (see
    :func:`level_colors`) so that a level has one colour in every figure.
    """
    if metric not in results.columns or x not in results.columns:
        return None
    hue = hue or x
    data = results[list(dict.fromkeys([x, hue, metric]))].copy()
    data[metric] = pd.to_numeric(data[metric], errors="coerce")
    data = data.loc[np.isfinite(data[metric].astype(float))]
    if data.empty:
        return None
    # seaborn's categorical plots assume a default index
    data = data.reset_index(drop=True)
    data[x] = _as_labels(data[x])
    data[hue] = _as_labels(data[hue])
    hue_levels = list(dict.fromkeys(data[hue]))
    colors = dict(palette or {})
    missing = [h for h in hue_levels if h not in colors]
    colors.update(level_colors(missing) if missing else {})
    colors = {h: colors[h] for h in hue_levels}
    dodge = hue != x and len(hue_levels) > 1
    n_points = data[x].nunique() * (len(hue_levels) if dodge else 1)
    fig = _new_figure(min(max(5.0, 0.9 * n_points + 3.0), 11.0), 3.6)
    ax = fig.subplots()
    sns.stripplot(data=data, x=x, y=metric, hue=hue, hue_order=hue_levels, dodge=dodge, ax=ax,
                  alpha=0.35, size=4, legend=False, jitter=0.08, palette=colors)
    sns.pointplot(data=data, x=x, y=metric, hue=hue, hue_order=hue_levels, errorbar="se",
                  capsize=0.08, dodge=0.53 if dodge else False, linestyle="none", marker="D",
                  ax=ax, palette=colors, legend=hue != x)
    ax.set_ylabel(ylabel or metric, fontsize=9)
    ax.set_xlabel(x)
    ax.grid(axis="y", alpha=0.3)
    if hue != x and ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title=hue)
    return figure_to_data_uri(fig)


# --------------------------------------------------------------------------- k-hat


def khat_regions(khat: np.ndarray, num_samples: int) -> np.ndarray:
    """Each k-hat's region for ``num_samples`` draws: ``good``, ``ok``, ``bad`` or
    ``undetermined`` (:func:`pyro_lvm.inference.reliability.khat_category`)."""
    return reliability.khat_category(khat, num_samples)


def khat_distribution(
    khats: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    num_samples: int,
    *,
    colors: Mapping[str, tuple] | None = None,
    styles: Mapping[str, str] | None = None,
) -> str | None:
    """Pareto k-hat of the importance weights per test row, one panel per configuration.

    ArviZ style (``arviz.plot_khat``): k-hat against the data-row index with reference lines at
    the K-aware threshold :math:`\\min(1 - 1/\\log_{10} K, 0.7)` (dotted) and 0.7 (dashed),
    points coloured by region; each panel states the share of rows in each region. A last
    panel overlays the empirical CDFs of all configurations, its legend outside the axes.

    Parameters
    ----------
    khats : mapping label -> 1-D array or list of 1-D arrays
        Per-row k-hat of each configuration; a list holds one array per seed (drawn over the
        same row index, since the seeds evaluate the same test rows).
    num_samples : int
        K, the draws behind each k-hat.
    colors, styles : mapping label -> colour / line style, optional
        Of each configuration's ECDF (its factor level's colour, its other setting's style).
    """
    threshold = reliability.khat_threshold(num_samples)
    per_seed: dict[str, list[np.ndarray]] = {}
    for label, value in khats.items():
        arrays = value if isinstance(value, (list, tuple)) else [value]
        arrays = [np.asarray(a, dtype=float).ravel() for a in arrays]
        # a seed whose k-hats are all undetermined still counts in the shares of its panel
        arrays = [a for a in arrays if a.size]
        if arrays:
            per_seed[label] = arrays
    if not per_seed:
        return None
    every_row = {label: np.concatenate(arrays) for label, arrays in per_seed.items()}
    pooled = {label: k[np.isfinite(k)] for label, k in every_row.items()}
    n = len(per_seed)
    cols = min(_MAX_COLS, n)
    fig = _new_figure(3.6 * cols + 3.4, 2.8 * math.ceil(n / cols) + 3.0)
    grid = fig.add_gridspec(math.ceil(n / cols) + 1, cols)
    axes = [fig.add_subplot(grid[i // cols, i % cols]) for i in range(n)]
    for ax in axes[1:]:
        ax.sharey(axes[0])
    region_colors = {"good": "#1b9e77", "ok": "#d95f02", "bad": "#d62728"}
    lines = ((threshold, ":"), (reliability.KHAT_BAD, "--"))
    for ax, (label, arrays) in zip(axes, per_seed.items()):
        for values in arrays:
            index = np.arange(values.size)
            region = khat_regions(values, num_samples)
            for name in ("good", "ok", "bad"):
                sel = (region == name) & np.isfinite(values)
                ax.scatter(index[sel], values[sel], s=6, color=region_colors[name], alpha=0.6,
                           linewidths=0)
        for level, style in lines:
            ax.axhline(level, color="0.3", ls=style, lw=1)
        region = khat_regions(every_row[label], num_samples)
        shares = [f"{name}: {np.mean(region == key):.0%}" for name, key in
                  ((f"≤{threshold:.2f}", "good"), (f"{threshold:.2f}–0.7", "ok"),
                   (">0.7", "bad"), ("undetermined", "undetermined"))
                  if key != "undetermined" or np.any(region == key)]
        ax.text(0.02, 0.97, "\n".join(shares), transform=ax.transAxes, va="top", fontsize=7,
                bbox=dict(boxstyle="round", fc="white", ec="0.8", alpha=0.85))
        ax.set_title(_wrap(label), fontsize=9)
        ax.set_xlabel("test row", fontsize=8)
        ax.set_ylabel("Pareto k̂", fontsize=8)
        ax.tick_params(labelsize=7)
    ax = fig.add_subplot(grid[-1, :])
    fallback = level_colors(list(pooled))
    for label, k in pooled.items():
        if not k.size:
            continue
        x = np.sort(k)
        ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", lw=1.4, label=label,
                color=(colors or {}).get(label, fallback[label]),
                ls=(styles or {}).get(label, "-"))
    for level, style in lines:
        ax.axvline(level, color="0.3", ls=style, lw=1)
    ax.set_title("ECDF of k̂, all configurations", fontsize=9)
    ax.set_xlabel(f"Pareto k̂ (dotted: threshold {threshold:.2f} for K = {num_samples}; "
                  f"dashed: 0.7)", fontsize=8)
    ax.set_ylabel("fraction of rows ≤ k̂", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return figure_to_data_uri(fig)


# --------------------------------------------------------------------------- latent usage


def latent_usage(
    active_units: pd.DataFrame | None,
    kl_per_dim: Mapping[str, np.ndarray],
    *,
    label_column: str = "configuration",
    colors: Mapping[str, tuple] | None = None,
    hatches: Mapping[str, str] | None = None,
) -> str | None:
    """Active units per configuration (mean ± se over seeds) and KL per latent dimension.

    Parameters
    ----------
    active_units : DataFrame or None
        Columns ``label_column`` and ``active_units``, one row per successful run.
    kl_per_dim : mapping label -> 1-D array
        Mean over seeds of :math:`\\mathrm{KL}(q(z_j|x) \\| p(z_j))` averaged over data rows, per
        latent dimension :math:`j`.
    colors, hatches : mapping label -> colour / hatch, optional
        Each configuration's factor-level colour and its other setting's hatch.
    """
    has_au = (active_units is not None and not active_units.empty
              and "active_units" in active_units.columns
              and pd.to_numeric(active_units["active_units"], errors="coerce").notna().any())
    kl_per_dim = {k: np.asarray(v, dtype=float).ravel() for k, v in kl_per_dim.items()
                  if v is not None and np.asarray(v).size}
    if not has_au and not kl_per_dim:
        return None
    labels = list(dict.fromkeys(
        ([*active_units[label_column].astype(str)] if has_au else []) + list(kl_per_dim)))
    fallback = level_colors(labels)
    color_of = {lab: (colors or {}).get(lab, fallback[lab]) for lab in labels}
    hatch_of = {lab: (hatches or {}).get(lab, "") for lab in labels}
    dims = max((v.size for v in kl_per_dim.values()), default=0)
    widths = ([1.0] if has_au else []) + ([max(1.4, 0.35 * dims)] if kl_per_dim else [])
    fig = _new_figure(min(4.2 * len(widths) + 0.4 * dims + 2.0, 14.0),
                      max(3.4, 0.28 * len(labels) + 1.6))
    axes = list(np.atleast_1d(fig.subplots(1, len(widths), width_ratios=widths)))
    if has_au:
        ax = axes.pop(0)
        data = active_units[[label_column, "active_units"]].copy()
        data["active_units"] = pd.to_numeric(data["active_units"], errors="coerce")
        stats = data.groupby(label_column, sort=False)["active_units"].agg(["mean", "std",
                                                                            "count"])
        stats = stats.reindex([lab for lab in labels if lab in stats.index])
        se = (stats["std"] / np.sqrt(stats["count"])).fillna(0.0)
        y = np.arange(len(stats))
        ax.barh(y, stats["mean"], xerr=se, color=[color_of[lab] for lab in stats.index],
                hatch=None, edgecolor="0.25", capsize=3, error_kw={"linewidth": 1})
        for bar, lab in zip(ax.patches, stats.index):
            bar.set_hatch(hatch_of[lab])
        ax.set_yticks(y, list(stats.index), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("active units (mean ± se over seeds)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    if kl_per_dim:
        ax = axes.pop(0)
        width = 0.8 / len(kl_per_dim)
        for i, (label, kl) in enumerate(kl_per_dim.items()):
            x = np.arange(kl.size) + (i - (len(kl_per_dim) - 1) / 2) * width
            ax.bar(x, kl, width=width, color=color_of[label], hatch=hatch_of[label],
                   edgecolor="0.25", linewidth=0.5, label=label)
        ax.set_xticks(np.arange(dims))
        ax.set_xlabel("latent dimension j", fontsize=8)
        ax.set_ylabel("KL per dim (nats, mean over seeds)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return figure_to_data_uri(fig)


# --------------------------------------------------------------------------- images


def image_mosaic(images: np.ndarray, image_shape: Sequence[int], columns: int = 10,
                 pad: float = np.nan) -> np.ndarray:
    """Tile rows of ``images`` (``[n, h*w]``) into one ``[rows*(h+1)-1, cols*(w+1)-1]`` array."""
    images = _check_2d(images, "images")
    h, w = (int(s) for s in image_shape)
    if images.shape[1] != h * w:
        raise ValueError(
            f"images have {images.shape[1]} columns, image_shape {tuple(image_shape)} needs {h * w}"
        )
    n = images.shape[0]
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    mosaic = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1), pad, dtype=float)
    for i, img in enumerate(images.reshape(n, h, w)):
        r, c = divmod(i, columns)
        mosaic[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = img
    return mosaic


def _show_mosaic(ax, mosaic: np.ndarray, title: str, vmin: float, vmax: float) -> None:
    # masked (NaN) pixels are the separators between images
    cmap = sns.color_palette("Greys", as_cmap=True).with_extremes(bad="#9ecae1")
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=vmin, vmax=vmax,
              interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _range(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low - 0.5, high + 0.5)


#: Widest figure in inches: at _DPI it fits a 1280 px page without being scaled down.
_MAX_WIDTH = 14.0


def _image_panel(n_panels: int, mosaic_width: int, mosaic_height: int) -> tuple[float, float]:
    """Panel size (inches) of an image mosaic: 0.04 in per pixel (8x8 digits: 3.2 in for
    10 images), at least 3.4 in wide, and narrower for large images so that a row of facets
    stays within :data:`_MAX_WIDTH`; the height keeps the mosaic's aspect ratio."""
    width = max(3.4, 0.04 * mosaic_width)
    width = min(width, _MAX_WIDTH / min(_MAX_COLS, max(n_panels, 1)))
    height = max(1.2, width * mosaic_height / max(mosaic_width, 1) + 0.6)
    return width, height


def samples_grid(samples: Mapping[str, np.ndarray], image_shape: Sequence[int],
                 max_images: int = 40) -> str | None:
    """Model samples :math:`x \\sim p(x)` as image mosaics, one panel per configuration."""
    samples = {k: _check_2d(v, f"samples of {k}")[:max_images] for k, v in samples.items()
               if v is not None and np.asarray(v).size}
    if not samples:
        return None
    h, w = (int(s) for s in image_shape)
    cols = 10
    rows = math.ceil(max(v.shape[0] for v in samples.values()) / cols)
    panel = _image_panel(len(samples), cols * w, rows * h)
    fig, axes = _facets(len(samples), panel=panel)
    for ax, (label, x) in zip(axes, samples.items()):
        _show_mosaic(ax, image_mosaic(x, image_shape, cols), label, *_range(x))
    return figure_to_data_uri(fig)


def reconstructions(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    image_shape: Sequence[int], max_images: int = 10) -> str | None:
    """Test images (top row) above their reconstructions (bottom row), per configuration."""
    pairs = {k: (_check_2d(o, f"originals of {k}")[:max_images],
                 _check_2d(r, f"reconstructions of {k}")[:max_images])
             for k, (o, r) in pairs.items() if o is not None and r is not None}
    if not pairs:
        return None
    for label, (o, r) in pairs.items():
        if o.shape != r.shape:
            raise ValueError(
                f"originals {o.shape} and reconstructions {r.shape} of {label} differ in shape")
    h, w = (int(s) for s in image_shape)
    cols = max(o.shape[0] for o, _ in pairs.values())
    panel = _image_panel(len(pairs), cols * w, 2 * h)
    fig, axes = _facets(len(pairs), panel=panel)
    for ax, (label, (o, r)) in zip(axes, pairs.items()):
        top = image_mosaic(o, image_shape, o.shape[0])
        bottom = image_mosaic(r, image_shape, r.shape[0])
        gap = np.full((1, top.shape[1]), np.nan)
        _show_mosaic(ax, np.vstack([top, gap, bottom]), label, *_range(o, r))
    return figure_to_data_uri(fig)


# --------------------------------------------------------------------------- latent space


def pca_projection(reference: np.ndarray, components: int = 2):
    """Principal axes of ``reference`` (rows are points) as a function projecting any array.

    Returns ``(project, explained)`` where ``project(X) = (X - mean) V[:, :components]`` and
    ``explained`` is the share of variance of each kept axis. Signs are fixed so that each
    axis's largest-magnitude loading is positive, making plots reproducible.
    """
    reference = _check_2d(reference, "reference")
    mean = reference.mean(axis=0)
    _, s, vt = np.linalg.svd(reference - mean, full_matrices=False)
    vt = vt[:components]
    signs = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(axis=1)])
    vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
    total = float(np.sum(s**2))
    explained = (s[:components] ** 2 / total) if total > 0 else np.zeros(len(vt))

    def project(x: np.ndarray) -> np.ndarray:
        return (_check_2d(x, "points") - mean) @ vt.T

    return project, explained


def _axis_names(dim: int, explained) -> tuple[str, str]:
    if dim <= 2:
        return "z₁", "z₂"
    return (f"PC 1 of E_q[z|x] ({explained[0]:.0%} var.)",
            f"PC 2 of E_q[z|x] ({explained[1]:.0%} var.)")


def latent_scatter(latents: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
                   max_points: int = 2000) -> str | None:
    """Posterior means :math:`E_q[z|x]` of test rows coloured by label, per configuration.

    Two-dimensional latents are drawn as they are; higher dimensions are projected on their
    first two principal components (the axis labels give the variance each explains); a
    one-dimensional latent is drawn against the label.
    """
    latents = {k: (_check_2d(m, f"latent means of {k}")[:max_points],
                   None if y is None else np.asarray(y).ravel()[:max_points])
               for k, (m, y) in latents.items() if m is not None and np.asarray(m).size}
    if not latents:
        return None
    all_labels = [y for _, y in latents.values() if y is not None]
    classes = (np.unique(np.concatenate(
        [_as_labels(pd.Series(np.asarray(y).ravel())).to_numpy(dtype=str) for y in all_labels]))
        if all_labels else np.array([]))
    if classes.size and all(c.lstrip("-").isdigit() for c in classes):
        classes = np.array(sorted(classes, key=int))
    palette = dict(zip(classes, sns.color_palette("tab10" if classes.size <= 10 else "husl",
                                                  max(classes.size, 1))))
    fig, axes = _facets(len(latents))
    for ax, (label, (z, y)) in zip(axes, latents.items()):
        if y is not None and y.size != z.shape[0]:
            raise ValueError(
                f"{label}: {y.size} labels for {z.shape[0]} latent means; they must match")
        if z.shape[1] == 1:
            frame = pd.DataFrame({"z": z[:, 0], "label": y if y is not None else 0})
            frame["label"] = _as_labels(frame["label"])
            order = [c for c in classes if c in set(frame["label"])] or None
            sns.stripplot(data=frame, x="z", y="label", ax=ax, size=2.5, alpha=0.6,
                          hue="label", order=order, hue_order=order, legend=False, jitter=0.3,
                          palette=palette if order else None)
            ax.set_xlabel("z", fontsize=8)
        else:
            project, explained = pca_projection(z)
            xy = z[:, :2] if z.shape[1] == 2 else project(z)
            names = _axis_names(z.shape[1], explained)
            if y is None:
                ax.scatter(xy[:, 0], xy[:, 1], s=5, alpha=0.6, color="C0", linewidths=0)
            else:
                y_str = _as_labels(pd.Series(np.asarray(y).ravel())).to_numpy(dtype=str)
                for cls in classes:
                    sel = y_str == cls
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=5, alpha=0.7, color=palette[cls],
                               linewidths=0)
            ax.set_xlabel(names[0], fontsize=8)
            ax.set_ylabel(names[1], fontsize=8)
        ax.set_title(_wrap(label), fontsize=8)
        ax.tick_params(labelsize=7)
    if 0 < classes.size <= 20:
        handles = [Line2D([], [], ls="none", marker="o", ms=4, color=palette[c]) for c in classes]
        fig.legend(handles, list(classes), loc="outside right upper", title="label",
                   fontsize=7, title_fontsize=7)
    return figure_to_data_uri(fig)


def _kde_grid(points: np.ndarray, extent_points: np.ndarray, size: int = 60):
    """Gaussian KDE of 2-D ``points`` (Scott's bandwidth, full covariance) on a grid.

    :math:`\\hat f(u) = \\frac1n \\sum_i \\mathcal N(u; p_i, h^2 \\Sigma)` with
    :math:`h = n^{-1/6}` (Scott 1992). Returns ``(x, y, density)`` or ``None`` when the
    points are degenerate (singular covariance).
    """
    points = points[np.all(np.isfinite(points), axis=1)]
    if points.shape[0] < 3:
        return None
    cov = np.cov(points.T) * points.shape[0] ** (-2.0 / 6.0)
    if not np.all(np.isfinite(cov)) or np.linalg.matrix_rank(cov) < 2:
        return None
    low, high = extent_points.min(axis=0), extent_points.max(axis=0)
    pad = 0.1 * (high - low)
    gx, gy = np.meshgrid(np.linspace(low[0] - pad[0], high[0] + pad[0], size),
                         np.linspace(low[1] - pad[1], high[1] + pad[1], size))
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    # whiten with the Cholesky factor: Mahalanobis distances become Euclidean ones
    whiten = np.linalg.inv(np.linalg.cholesky(cov))
    g, p = grid @ whiten.T, points @ whiten.T
    squared = (g**2).sum(1)[:, None] + (p**2).sum(1)[None, :] - 2.0 * g @ p.T
    norm = 2 * np.pi * np.sqrt(np.linalg.det(cov))
    density = np.exp(-0.5 * np.maximum(squared, 0.0)).mean(axis=1) / norm
    return gx, gy, density.reshape(gx.shape)


def _hdr_levels(density: np.ndarray, masses) -> list[float]:
    """Density thresholds whose super-level sets hold the given probability masses (on the grid).

    Returned increasing, as :meth:`matplotlib.axes.Axes.contour` requires.
    """
    values = np.sort(density.ravel())[::-1]
    cumulative = np.cumsum(values) / values.sum()
    levels = [float(values[min(np.searchsorted(cumulative, m), values.size - 1)]) for m in masses]
    return sorted(set(levels))


def prior_vs_aggregate_posterior(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    max_points: int = 2000,
) -> str | None:
    """Prior density :math:`p(z)` (contours of a KDE of prior samples) against the aggregate
    posterior :math:`q(z) = \\frac1N \\sum_i q(z|x_i)` (scatter of its samples).

    Where the scatter leaves prior mass uncovered, samples from the prior decode to
    atypical data (the "holes" the VampPrior and mixture priors aim to close; Tomczak &
    Welling 2018). Latents with more than two dimensions are projected on the principal axes
    of the aggregate-posterior samples, the same projection for both clouds.

    Parameters
    ----------
    pairs : mapping label -> (prior_samples [s, d], aggregate_posterior_samples [s, d])
    """
    pairs = {k: (_check_2d(p, f"prior samples of {k}")[:max_points],
                 _check_2d(q, f"aggregate posterior samples of {k}")[:max_points])
             for k, (p, q) in pairs.items() if p is not None and q is not None}
    if not pairs:
        return None
    fig, axes = _facets(len(pairs))
    for ax, (label, (prior, post)) in zip(axes, pairs.items()):
        if prior.shape[1] != post.shape[1]:
            raise ValueError(f"{label}: prior samples have {prior.shape[1]} dimensions, "
                             f"aggregate posterior samples {post.shape[1]}")
        d = prior.shape[1]
        if d == 1:
            bins = np.histogram_bin_edges(np.concatenate([prior[:, 0], post[:, 0]]), bins=40)
            ax.hist(prior[:, 0], bins=bins, density=True, histtype="step", color="0.2")
            ax.hist(post[:, 0], bins=bins, density=True, alpha=0.5, color="C1")
            ax.set_xlabel("z", fontsize=8)
            ax.set_ylabel("density", fontsize=8)
        else:
            project, explained = pca_projection(post)
            p2 = prior[:, :2] if d == 2 else project(prior)
            q2 = post[:, :2] if d == 2 else project(post)
            ax.scatter(q2[:, 0], q2[:, 1], s=4, alpha=0.45, color="C1", linewidths=0)
            density = _kde_grid(p2, np.vstack([p2, q2]))
            if density is not None:
                gx, gy, dens = density
                ax.contour(gx, gy, dens, levels=_hdr_levels(dens, (0.25, 0.5, 0.75, 0.9, 0.99)),
                           colors="0.15", linewidths=0.9)
            else:
                ax.scatter(p2[:, 0], p2[:, 1], s=3, color="0.2", alpha=0.3)
            names = ("z₁", "z₂") if d == 2 else (f"PC 1 of q(z) ({explained[0]:.0%} var.)",
                                                  f"PC 2 of q(z) ({explained[1]:.0%} var.)")
            ax.set_xlabel(names[0], fontsize=8)
            ax.set_ylabel(names[1], fontsize=8)
        ax.set_title(_wrap(label), fontsize=8)
        ax.tick_params(labelsize=7)
    if any(p.shape[1] == 1 for p, _ in pairs.values()):
        handles = [Line2D([], [], color="0.2"), Line2D([], [], color="C1", lw=6, alpha=0.5)]
        names = ["prior p(z)", "aggregate posterior q(z)"]
    else:
        handles = [Line2D([], [], color="0.15", lw=0.9),
                   Line2D([], [], ls="none", marker="o", ms=4, color="C1", alpha=0.6)]
        names = ["prior p(z): KDE contours of 25/50/75/90/99% highest density",
                 "aggregate posterior q(z): samples"]
    fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize=7)
    return figure_to_data_uri(fig)
