"""The ``aenode`` command: the command-line layer, kept apart from the domain code.

One module per command group (``serve``, ``run``, ``store`` for status/jobs/retry,
``select``, ``models``, ``train``, ``evaluate``, ``echo``, ``config``); each command is a
function ``(args, settings) -> exit code`` that calls domain functions returning data and
prints them. This module parses the arguments, loads the settings once and configures
logging (the only place that does). ``--config`` and ``--verbose`` are accepted before or
after the command (``aenode --config c.yaml serve`` and ``aenode serve --config c.yaml``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aenode.cli.logs import configure_logging
from aenode.config import ConfigError, Settings, load_settings
from aenode.errors import InputError
from aenode.version import __version__

__all__ = ["configure_logging", "main"]

Handler = Callable[[argparse.Namespace, Settings], int]


def _lazy(target: str) -> Handler:
    # Commands import what they need (torch for some) only when they run.
    module_name, func_name = target.split(":")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        module = importlib.import_module(f"aenode.cli.{module_name}")
        func: Handler = getattr(module, func_name)
        return func(args, settings)

    return run


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=default,
        help="YAML configuration (default: ./config.yaml when present)",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="debug logging",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aenode", description="DICOM network inference node (DIMSE in, AI results out)."
    )
    parser.add_argument("--version", action="version", version=f"aenode {__version__}")
    _global_options(parser, None)
    # The same options after the command; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, target: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(handler=_lazy(target))
        return p

    command("serve", "serve:command_serve", "run the node: receive, select, infer, export")

    p = command("echo", "echo:command_echo", "C-ECHO a DICOM peer")
    p.add_argument("host", help="the peer's host name or address")
    p.add_argument("port", type=int, help="the peer's DICOM port")
    p.add_argument(
        "--aet",
        default=None,
        help="called AE title (default node.ae_title, so that `aenode echo HOST PORT` reaches "
        "our own node)",
    )
    p.add_argument("--calling-aet", default=None, help="our AE title (default node.ae_title)")

    p = sub.add_parser("config", parents=[common], help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    pc = csub.add_parser(
        "check", parents=[common], help="validate a configuration and the rules' model names"
    )
    pc.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=None,
        help="the configuration to check (default: --config, else ./config.yaml)",
    )
    pc.set_defaults(handler=_lazy("config:command_config_check"))

    p = command("status", "store:command_status", "recent series and jobs with their state")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--limit", type=int, default=50, help="at most this many series and jobs")

    p = command("select", "select:command_select", "dry-run the selection rules on DICOM files")
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (recursive)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--no-volume-check",
        action="store_true",
        help="do not build the matched series' volumes (headers only: faster, but a series "
        "whose geometry a job would reject still shows as matched)",
    )

    p = command("models", "models:command_models", "list the model packages")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = command("train", "train:command_train", "train a model by its recipe, write its package")
    p.add_argument("model", help="the recipe: hippocampus or brain-tumour")
    p.add_argument(
        "--data", type=Path, required=True, help="the training data (imagesTr/, labelsTr/)"
    )
    p.add_argument("--out", type=Path, required=True, help="the model package folder to write")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="checkpoints and the per-epoch log (default var/train/MODEL)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--minutes", type=float, default=None, help="training time budget (default 30)"
    )
    budget.add_argument(
        "--epochs", type=int, default=None, help="fixed epoch count (reproducible on CPU)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument(
        "--export-only",
        action="store_true",
        help="skip training: write the package from --work's best checkpoint",
    )
    p.add_argument(
        "--progress", action="store_true", help="show the progress bar also when not a terminal"
    )

    p = command("evaluate", "evaluate:command_evaluate", "metrics of a model against labels")
    p.add_argument("--model", required=True, help="a model package under models.path")
    p.add_argument(
        "--images",
        type=Path,
        required=True,
        help="folder of <case>.nii.gz files or <case>/ DICOM series folders; for a model with "
        "several roles <case>/<role>/ folders (or <case>/<role>.nii.gz)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="segmentation: folder of <case>.nii.gz label maps; classification: a CSV "
        "(case,label with a class name per case, or case,<class>,... with 0/1 per class) "
        "or a folder holding labels.csv",
    )
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument(
        "--predictions",
        type=Path,
        default=None,
        help="write each case's predicted label map here (NIfTI, the image's name and grid)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON (no NaN)")

    p = command("run", "run:command_run", "select, infer and write results for DICOM folders")
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (recursive)")
    p.add_argument("--out", type=Path, required=True, help="folder for the result objects")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = command("jobs", "store:command_jobs", "jobs with their state and per-stage times")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--limit", type=int, default=50, help="at most this many jobs")

    p = command("audit", "audit:command_audit", "the audit trail of one study, in order")
    p.add_argument("study", help="the Study Instance UID")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = command(
        "retry",
        "store:command_retry",
        "queue a failed or quarantined job's export (or job) again; --quarantined: all",
    )
    p.add_argument("job", type=int, nargs="?", help="the job's id (aenode jobs)")
    p.add_argument(
        "--quarantined",
        action="store_true",
        help="take every quarantined item (series, hand-over, study rule, job, export) out",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aenode`` command.

    Parameters
    ----------
    argv : sequence of str or None
        Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns
    -------
    int
        The process exit status: 0 success, 1 failure, 2 bad usage or configuration.
    """
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a reader that left shows here, not at exit
        return code
    except BrokenPipeError:
        # `aenode status | head`: the reader left; not an error of ours. Point stdout at
        # devnull so that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


def _main(argv: Sequence[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    config_path: Path | None = args.config
    if config_path is None and Path("config.yaml").is_file():
        config_path = Path("config.yaml")
        args.config = config_path
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"aenode: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings, verbose=args.verbose)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except InputError as exc:  # bad configuration, model package or input: named, no trace
        print(f"aenode: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
