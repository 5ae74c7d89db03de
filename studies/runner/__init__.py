"""The study runner: a dataset x a grid of configurations x seeds, run to disk.

A *run* is one :class:`RunConfig` (model family, prior, observation model, objective,
architecture, optimization settings, seed) fit to the training split and evaluated on the
test split. A *study* is a list of runs on one :class:`~pyro_lvm.studies.datasets.Dataset`.
:func:`run_study` executes the runs one after another and keeps everything on disk::

    <out_dir>/<study>/study.json            what, on which data, with which code, when
                                            (every invocation: command line, start, end,
                                            the runs it computed; total compute time)
    <out_dir>/<study>/results.csv           one row per run of the grid: config, status, metrics
    <out_dir>/<study>/index.html            the report (reports.render_report)
    <out_dir>/<study>/.lock, .lock.json     held by the one invocation writing the study
    <out_dir>/<study>/runs/<run_id>/
        config.json     the run's configuration (flat: the config columns of results.csv)
        history.csv     learning curves (epoch, step, train_objective, valid_objective, ...)
        model.pt        the fitted state_dict (its SHA-256 is in result.json)
        artifacts.npz   arrays for the report (see ARTIFACTS)
        result.json     schema, run id, configuration hash, status, metrics, timings, device;
                        written LAST: it marks completion

Durability. Every file is written atomically (a temporary file in the same directory, then
:func:`os.replace`), and ``result.json`` is written only after everything else of the run,
so a run directory either has a valid ``result.json`` (the run is done and is never
recomputed) or it is redone from scratch. A ``result.json`` is verified before it is
trusted (:func:`~pyro_lvm.studies.runner.results.read_result`): one that belongs to
another run, lacks its metrics, or whose ``model.pt`` does not match is recomputed, with a
note. Re-running the same command therefore resumes a study: Ctrl-C or a kill loses at
most the run in progress. ``fresh=True`` deletes earlier runs first.

Failures. Bad *data* are caught before anything is trained or written: the dataset is
validated against every model of the grid up front (:func:`validate_study`) and a
ValueError names the problem, leaving an earlier study directory untouched. A failing
*run* (a non-finite loss, a configuration its model rejects, any other exception) is
recorded with status ``"failed"``, its message and traceback, and the grid goes on. A
failing *disk* (full, read-only, no permission) stops the study with one line
(:class:`StudyIOError`); the run it interrupted is redone by the next invocation. A second
invocation on the same study refuses (:class:`StudyLocked`) or waits (``wait=True``).

Modules: :mod:`.schema` (RunConfig, grids, identity), :mod:`.families` (model families:
add your own with ``families.register_family``), :mod:`.execution` (one run),
:mod:`.evaluation` (metrics and artifacts of a run), :mod:`.study` (orchestration),
:mod:`.results` (the results table, verified results), :mod:`.provenance`,
:mod:`.storage` (atomic writes), :mod:`.command_line` (the study scripts' command line).

Metrics (columns of ``results.csv``; every estimate with its standard error, every bound
called a bound):

``test_log_likelihood`` / ``_se`` / ``_data_se``
    Importance-sampled estimate of the mean test log p(x) in nats per row with
    ``num_eval_samples`` draws from the guide (the IWAE_K bound in expectation,
    :func:`pyro_lvm.inference.evaluate.log_likelihood`), its Monte Carlo standard error and
    its standard error across test rows.
``exact_test_log_likelihood``
    Exact mean test log p(x) (linear models; empty otherwise).
``test_elbo`` / ``_se``
    Held-out ELBO (a lower bound), with its Monte Carlo standard error.
``kl``, ``active_units``
    Mean KL(q(z|x) || p(z)) over test rows, and the number of latent dimensions with
    Var_x E_q[z_j | x] > 0.01 (Burda et al. 2016).
``khat_good_frac``, ``khat_ok_frac``, ``khat_bad_frac``, ``khat_median``, ``khat_max``
    Pareto k-hat of each test row's importance weights from ``khat_num_samples`` = K draws
    (k <= min(1 - 1/log10 K, 0.7) good, from there to 0.7 more draws needed, > 0.7 bad).
``khat_unreliable_frac``, ``test_log_likelihood_psis``
    Share of test rows with k-hat above min(1 - 1/log10 K, 0.7) (estimates not
    trustworthy), and the mean PSIS-smoothed estimate of log p(x) from the same K draws.
``bits_per_dim`` / ``_se``
    For binary data.
``train_time_s``, ``eval_time_s``, ``wall_time_s``, ``device``
"""
from pyro_lvm.studies.runner import families
from pyro_lvm.studies.runner.command_line import (add_common_args, base_config_from_args, cli,
                                                  dataset_from_args, finish_message, fraction,
                                                  nonnegative_int, parse_study_args,
                                                  positive_float, positive_int, run_from_args,
                                                  study_name_from_args, study_parser)
from pyro_lvm.studies.runner.evaluation import ARTIFACTS
from pyro_lvm.studies.runner.execution import execute_run, run_data
from pyro_lvm.studies.runner.families import Family, build_model, build_objective, register_family
from pyro_lvm.studies.runner.results import load_results
from pyro_lvm.studies.runner.schema import METRIC_COLUMNS, RunConfig, StudyDataError, expand_grid
from pyro_lvm.studies.runner.lock import StudyLocked
from pyro_lvm.studies.runner.study import (StudyIOError, StudyResult, render_study, run_study,
                                           validate_study)

__all__ = [
    "RunConfig", "expand_grid", "StudyDataError", "METRIC_COLUMNS", "ARTIFACTS",
    "Family", "register_family", "families", "build_model", "build_objective",
    "execute_run", "run_data", "run_study", "StudyResult", "validate_study", "render_study",
    "StudyLocked", "StudyIOError",
    "load_results",
    "study_parser", "parse_study_args", "add_common_args", "dataset_from_args",
    "base_config_from_args", "study_name_from_args", "run_from_args", "finish_message", "cli",
    "positive_int", "nonnegative_int", "positive_float", "fraction",
]
