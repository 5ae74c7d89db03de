"""pyro-lvm: reports.

``render_report(study_dir)`` turns a study directory (``study.json``, ``results.csv``,
``runs/<run_id>/...``) into one self-contained HTML file; :mod:`pyro_lvm.reports.analysis` holds the
statistics (summaries over seeds, paired differences, the verdict) and :mod:`pyro_lvm.reports.figures`
the plots.
"""
from .render import render_report

__all__ = ["render_report"]
