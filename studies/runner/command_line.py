"""The command line every study script shares.

A study script is three functions over this module::

    def parse_args(argv=None):
        parser, options = cli.study_parser("my_study", "What it compares.", DEFAULTS)
        options.add_argument("--widths", type=cli.positive_int, nargs="+", default=[8, 16])
        return cli.parse_study_args(parser, argv, smoke={"widths": [8]})

    def main(args):                       # dataset, grid, run_from_args, finish_message
        ...

    if __name__ == "__main__":
        cli.cli(main, parse_args)

Every flag is checked by its ``type`` while parsing (exit status 2 and a message naming the
flag and the accepted range, before any run), prefixes of flags are not accepted, a common
flag the script would ignore is left out of its parser (``omit=``: argparse then refuses it),
and ``--smoke`` changes only the flags the user did not give.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import shlex
import sys
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from pyro_lvm.paths import DEFAULT_OUT_DIR
from pyro_lvm.studies.datasets import Dataset, load_dataset
from pyro_lvm.studies.runner.executors import EXECUTORS, make_executor, ray_missing_message
from pyro_lvm.studies.runner.schema import RunConfig, StudyDataError, slug
from pyro_lvm.studies.runner.lock import StudyLocked
from pyro_lvm.studies.runner.study import StudyIOError, StudyResult, run_study
from pyro_lvm.studies.runner.user_models import load_factory, user_configs

__all__ = ["study_parser", "parse_study_args", "add_common_args", "positive_int",
           "nonnegative_int", "positive_float", "fraction", "parse_hidden", "hidden_widths", "SMOKE_SETTINGS",
           "study_name_from_args", "dataset_from_args", "base_config_from_args", "run_from_args",
           "user_models_from_args",
           "finish_message", "cli"]


# ---------------------------------------------------------------------------- flag types
def _integer(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse ``type``)."""
    return _integer(text, 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (argparse ``type``)."""
    return _integer(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse ``type``)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (argparse ``type``)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return value


def parse_hidden(text) -> Tuple[int, ...]:
    """Hidden layer widths from ``64x64`` or ``200,200`` (each >= 1); ValueError otherwise."""
    from pyro_lvm.studies.runner.schema import _as_tuple

    if isinstance(text, (tuple, list)):
        hidden = tuple(int(h) for h in text)
    else:
        try:
            hidden = _as_tuple(text)
        except ValueError:
            raise ValueError(f"must look like 64x64 or 200,200; got {text!r}") from None
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"must be widths >= 1 like 64x64, got {text!r}")
    return hidden


def hidden_widths(text: str) -> str:
    """``--hidden``: widths like ``64x64`` (argparse ``type``; kept as the normalized text)."""
    try:
        return "x".join(str(h) for h in parse_hidden(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------------------- the parser
#: The common flags: dest -> (flags, argparse keywords, help). ``%(default)s`` in the help.
COMMON_FLAGS = {
    "latent_dim": (("--latent-dim",), dict(type=positive_int), "latent dimension d"),
    "hidden": (("--hidden",), dict(type=hidden_widths),
               "hidden layer widths of encoder and decoder, e.g. 200x200"),
    "epochs": (("--epochs",), dict(type=positive_int), "training epochs"),
    "batch_size": (("--batch-size",), dict(type=positive_int), "minibatch size"),
    "lr": (("--lr",), dict(type=positive_float), "Adam learning rate"),
    "num_particles": (("--num-particles", "-K"), dict(type=positive_int),
                      "K of the IWAE objective"),
    "warmup_epochs": (("--warmup-epochs",), dict(type=nonnegative_int),
                      "KL warm-up epochs for the ELBO"),
    "num_eval_samples": (("--num-eval-samples",), dict(type=positive_int),
                         "importance samples per test row for the log-likelihood estimate"),
    "seeds": (("--seeds",), dict(type=nonnegative_int, nargs="+"),
              "seeds (replicates) of every configuration"),
}
COMMON_DEFAULTS = dict(dataset="digits", latent_dim=2, hidden="64x64", epochs=10, batch_size=100,
                       lr=1e-3, num_particles=5, num_eval_samples=1000, seeds=[0, 1, 2],
                       device="cpu", out_dir=DEFAULT_OUT_DIR, warmup_epochs=0)


class _AppendModel(argparse.Action):
    """``--model`` repeated: a list of the specs (like ``action="append"``, but starting a new
    list over whatever placeholder the namespace holds, which :func:`_given` relies on)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, (list(current) if isinstance(current, list) else [])
                + [values])


def add_common_args(parser: argparse.ArgumentParser, *, omit: Iterable[str] = (),
                    **defaults) -> argparse.ArgumentParser:
    """Flags shared by every study script; ``defaults`` override the built-in defaults and
    ``omit`` (dests such as ``"num_particles"``) leaves out flags the script would ignore."""
    d = {**COMMON_DEFAULTS, **defaults}
    omit = set(omit)
    g = parser.add_argument_group("common study options")
    g.add_argument("--dataset", default=d["dataset"],
                   help="'digits' (bundled with scikit-learn), 'binarized-mnist', or a CSV/.npy path "
                        "(relative to the current directory; default: %(default)s)")
    g.add_argument("--data-path", default=None,
                   help="file or directory holding binarized_mnist.npz (or the .amat files); "
                        "default: $PYRO_LVM_DATA, then ../shared/data next to the repository")
    g.add_argument("--max-rows", type=positive_int, default=None,
                   help="use at most this many rows per split (quick runs)")
    g.add_argument("--allow-missing", action="store_true",
                   help="treat empty / NaN cells of a CSV or .npy file as missing values (a mask) "
                        "instead of refusing them")
    g.add_argument("--label-column", default=None,
                   help="a column of the CSV file holding labels (kept out of the data; used to "
                        "colour latent plots)")
    for dest, (flags, kwargs, text) in COMMON_FLAGS.items():
        if dest not in omit:
            g.add_argument(*flags, dest=dest, default=d[dest], help=f"{text} (default: %(default)s)",
                           **kwargs)
    g.add_argument("--model", dest="user_models", action=_AppendModel, default=None,
                   metavar="MODULE:FACTORY",
                   help="add your own model/guide pair to the study (repeatable): FACTORY in "
                        "MODULE (importable from the current directory, e.g. mypairs.py) is "
                        "called with data_dim and the options latent_dim, hidden, likelihood "
                        "as keyword arguments it may ignore, and returns the pair")
    g.add_argument("--device", choices=["cpu", "cuda", "auto"], default=d["device"],
                   help="where to train and evaluate (default: %(default)s)")
    g.add_argument("--threads", type=nonnegative_int, default=1,
                   help="torch CPU threads; small models are fastest on 1 (0: torch's default; "
                        "default: %(default)s)")
    g.add_argument("--out-dir", default=d["out_dir"],
                   help="studies are written to OUT_DIR/<study> (relative to the current "
                        "directory; default: %(default)s)")
    g.add_argument("--smoke", action="store_true",
                   help="a tiny version of the study that runs in seconds (written to "
                        "<study>-smoke); flags given explicitly are kept")
    g.add_argument("--fresh", action="store_true", help="delete earlier runs of this study first")
    g.add_argument("--retry-failed", action="store_true", help="re-run runs that failed before")
    g.add_argument("--wait", action="store_true",
                   help="when another invocation is running this study, wait for it to finish "
                        "instead of refusing")
    g.add_argument("--executor", choices=list(EXECUTORS), default="local",
                   help="who runs the runs: 'local' (one after another in this process) or 'ray' "
                        "(each run a Ray task; needs pip install -e \".[ray]\"; default: "
                        "%(default)s)")
    g.add_argument("--ray-address", default=None,
                   help="with --executor ray: an existing Ray cluster ('auto', or the address "
                        "`ray start --head` prints); default: a private local Ray")
    g.add_argument("--no-report", action="store_true", help="do not render the HTML report")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars and no progress log lines")
    return parser


def study_parser(name: str, description: str, defaults: Mapping[str, Any], *,
                 omit: Iterable[str] = ()) -> Tuple[argparse.ArgumentParser,
                                                    argparse._ArgumentGroup]:
    """A study script's parser with the common flags, and the group for its own flags."""
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=description,
                                     allow_abbrev=False)
    add_common_args(parser, omit=omit, **defaults)
    return parser, parser.add_argument_group(f"{name} options")


#: What ``--smoke`` sets (for flags the user did not give).
SMOKE_SETTINGS = dict(latent_dim=2, hidden="16", epochs=2, batch_size=64, num_eval_samples=20,
                      seeds=[0], max_rows=300)


def _given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """The dests set explicitly on the command line (argparse fills only absent attributes
    with defaults, so a namespace holding a marker for every dest keeps the marker for the
    flags not given)."""
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions
                                      if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not marker}


def parse_study_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, *,
                     smoke: Optional[Mapping[str, Any]] = None,
                     check: Optional[Callable[[argparse.Namespace], Optional[str]]] = None
                     ) -> argparse.Namespace:
    """Parse ``argv``; with ``--smoke``, set :data:`SMOKE_SETTINGS` and the script's ``smoke``
    settings (a value or ``callable(args) -> value``) for every flag the user did not give.
    ``check(args)`` returns a message for a combination of flags that cannot run (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.given = sorted(_given(parser, argv))
    if args.smoke:
        settings = {**SMOKE_SETTINGS, "num_particles": lambda a: min(a.num_particles, 3),
                    "warmup_epochs": lambda a: min(a.warmup_epochs, 1), **dict(smoke or {})}
        for dest, value in settings.items():
            if hasattr(args, dest) and dest not in args.given:
                setattr(args, dest, value(args) if callable(value) else value)
    problem = _executor_problem(args) or (check(args) if check is not None else None)
    if problem:
        parser.error(problem)
    return args


def _executor_problem(args: argparse.Namespace) -> Optional[str]:
    executor = getattr(args, "executor", "local")
    if getattr(args, "ray_address", None) and executor != "ray":
        return "--ray-address needs --executor ray"
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        return ray_missing_message()
    return None


# ---------------------------------------------------------------------------- from flags to a study
def study_name_from_args(name: str, args: argparse.Namespace, dataset: Optional[Dataset] = None,
                         default_dataset: Optional[str] = None) -> str:
    """The study directory name: ``<name>``, ``<name>-<dataset>`` when the study runs on
    other data than its default (so a benchmark run never collides with the default one),
    and ``-smoke`` for smoke runs (which never overwrite a real study)."""
    out = name
    if dataset is not None and default_dataset is not None and dataset.name != default_dataset:
        out += f"-{slug(dataset.name)}"
    return f"{out}-smoke" if getattr(args, "smoke", False) else out


def dataset_from_args(args: argparse.Namespace, *, binarize: bool = False,
                      likelihood: Optional[str] = None, **kwargs) -> Dataset:
    """Load ``--dataset`` (with ``--data-path``, ``--max-rows``, ``--allow-missing``,
    ``--label-column``), validated for ``likelihood``.

    ``binarize`` applies to digits and user data (binarized MNIST is binary already).
    Raises before any training when the data are missing or unusable.
    """
    if args.dataset == "binarized-mnist":
        binarize = False
    for flag, key in (("allow_missing", "allow_missing"), ("label_column", "label_column")):
        if getattr(args, flag, None):
            kwargs.setdefault(key, getattr(args, flag))
    return load_dataset(args.dataset, binarize=binarize, likelihood=likelihood,
                        data_path=args.data_path, max_rows=args.max_rows, **kwargs)


def base_config_from_args(args: argparse.Namespace, **fields) -> RunConfig:
    """A RunConfig with the common flags filled in (``fields`` override)."""
    base = dict(latent_dim=args.latent_dim, hidden=parse_hidden(args.hidden), epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, num_eval_samples=args.num_eval_samples,
                warmup_epochs=args.warmup_epochs, device=args.device)
    base.update(fields)
    return RunConfig(**base)


def run_from_args(name: str, args: argparse.Namespace, dataset: Dataset, configs: Sequence[RunConfig],
                  *, title: str, description: str, primary_factor: str,
                  primary_metric: str = "test_log_likelihood",
                  default_dataset: Optional[str] = None,
                  findings: Optional[Callable[[pd.DataFrame], List[str]]] = None) -> StudyResult:
    """:func:`run_study` with the common flags (used by every study script), then prints
    :func:`finish_message` (where the results and the report are).

    ``primary_factor`` / ``primary_metric`` name the setting the study compares and the
    metric its verdict uses (the study's metadata). Each ``--model MODULE:FACTORY`` adds SVI
    runs of the user's pair, one per seed and per combination of the grid's settings that
    apply to any pair (:func:`~pyro_lvm.studies.runner.user_models.user_configs`: the
    objectives study runs every objective on it, the priors study one run per seed)."""
    study = study_name_from_args(name, args, dataset, default_dataset)
    models = user_models_from_args(args)
    if models:
        base = configs[0] if configs else base_config_from_args(args, likelihood="gaussian")
        configs = list(configs) + user_configs(base, list(models), args.seeds, grid=configs,
                                               factories=models)
    result = run_study(study, dataset, configs, out_dir=args.out_dir, models=models,
                     fresh=args.fresh, progress=not args.no_progress, render=not args.no_report,
                     title=title + (" (smoke test)" if args.smoke else ""), description=description,
                     retry_failed=args.retry_failed,
                     metadata={"primary_factor": primary_factor, "primary_metric": primary_metric},
                     num_threads=args.threads or None, findings=findings,
                     wait=getattr(args, "wait", False),
                     executor=make_executor(getattr(args, "executor", "local"),
                                            address=getattr(args, "ray_address", None)),
                     command_line=" ".join(shlex.quote(a) for a in ["python"] + sys.argv))
    print(finish_message(result))
    return result


def user_models_from_args(args: argparse.Namespace) -> dict:
    """``{"MODULE:FACTORY": factory}`` for every ``--model`` (ValueError naming a spec that
    cannot be loaded, before any run)."""
    return {spec: load_factory(spec) for spec in (getattr(args, "user_models", None) or [])}


def finish_message(result: StudyResult) -> str:
    """The lines a study script prints at the end (where the report is)."""
    n = len(result.results)
    ok = int((result.results["status"] == "ok").sum())
    lines = [*result.findings,
             f"{ok} of {n} runs ok ({len(result.executed)} run now, {len(result.skipped)} "
             f"found finished on disk, {len(result.failed)} failed)",
             f"results: {result.study_dir / 'results.csv'}"]
    if result.report is not None:
        lines.append(f"report:  {result.report.resolve()}")
    else:
        lines.append("report:  (not rendered)")
    return "\n".join(lines)


def cli(main: Callable[[argparse.Namespace], Any], parse_args: Callable[[], argparse.Namespace]) -> None:
    """Entry point of a study script: problems found before training (bad or missing data,
    a study directory holding other data, CUDA unavailable) are printed as one message
    naming the problem (exit status 2), Ctrl-C exits with status 130 after saying how to
    resume; runs finished before the interruption are kept on disk. Another invocation
    writing the study, a full or read-only disk: one line, exit status 1."""
    args = parse_args()
    try:
        main(args)
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same command again to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    except (StudyLocked, StudyIOError) as exc:  # the machine, not the input: status 1
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (StudyDataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
