"""The ``aenode`` command. The only place that configures logging.

Each sub-command is a plain function ``(args, settings) -> exit code`` living in the
module of its stage; this file only parses arguments and loads settings once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aenode import __version__
from aenode.config import ConfigError, Settings, load_settings
from aenode.phi import install_phi_filter

__all__ = ["main", "configure_logging"]

# "patient" is set only when logging.phi is on; nothing else in the context is PHI.
_CONTEXT_KEYS = (
    "study",
    "series",
    "sop_uid",
    "peer_ae",
    "assoc",
    "model",
    "job",
    "dest",
    "patient",
)

Handler = Callable[[argparse.Namespace, Settings], int]


class _ContextFormatter(logging.Formatter):
    """Appends the structured context passed in ``extra=`` as ``key=value`` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = [f"{k}={getattr(record, k)}" for k in _CONTEXT_KEYS if hasattr(record, k)]
        return f"{base} [{' '.join(ctx)}]" if ctx else base


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT_KEYS:
            if hasattr(record, key):
                obj[key] = getattr(record, key)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def configure_logging(settings: Settings, verbose: bool = False) -> None:
    """Send aenode's log records to stderr as text or JSON lines.

    Parameters
    ----------
    settings : Settings
        ``logging.level`` and ``logging.json`` are used.
    verbose : bool
        Force DEBUG.
    """
    handler = logging.StreamHandler(sys.stderr)
    if settings.logging.json_format:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _ContextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger("aenode")
    root.handlers[:] = [handler]
    install_phi_filter(handler, settings.logging.phi)  # libraries and warnings too, scrubbed
    root.setLevel("DEBUG" if verbose else settings.logging.level)
    root.propagate = False
    # pynetdicom is chatty at INFO; keep its warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _lazy(target: str) -> Handler:
    module_name, func_name = target.split(":")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        module = importlib.import_module(module_name)
        func: Handler = getattr(module, func_name)
        return func(args, settings)

    return run


def _config_check(args: argparse.Namespace, settings: Settings) -> int:
    path = args.path or args.config
    checked = load_settings(path) if path else settings
    rules = len(checked.selection.rules)
    print(f"{path or '(defaults)'}: OK ({rules} selection rule(s))")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aenode", description="DICOM network inference node (DIMSE in, AI results out)."
    )
    parser.add_argument("--version", action="version", version=f"aenode {__version__}")
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="YAML configuration (default: ./config.yaml when present)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the node: receive, select, infer, export")
    p.set_defaults(handler=_lazy("aenode.pipeline:command_serve"))

    p = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aet", default="ANY-SCP", help="called AE title")
    p.add_argument("--calling-aet", default=None, help="our AE title (default node.ae_title)")
    p.set_defaults(handler=_lazy("aenode.export.scu:command_echo"))

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    pc = csub.add_parser("check", help="validate a configuration file")
    pc.add_argument("path", nargs="?", type=Path, default=None)
    pc.set_defaults(handler=_config_check)

    p = sub.add_parser("status", help="recent series and jobs with their state")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=_lazy("aenode.status:command_status"))

    p = sub.add_parser("select", help="dry-run the selection rules on DICOM files or folders")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_lazy("aenode.select.explain:command_select"))

    p = sub.add_parser("models", help="list the model packages")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_lazy("aenode.infer.registry:command_models"))

    p = sub.add_parser("train", help="train a shipped model from data on disk")
    p.add_argument("model", choices=["hippocampus"])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None, help="training time budget")
    p.add_argument(
        "--epochs", type=int, default=None, help="fixed epoch count (bit-for-bit reproducible)"
    )
    p.set_defaults(handler=_lazy("aenode.infer.train:command_train"))

    p = sub.add_parser("evaluate", help="metrics of a model against reference labels")
    p.add_argument("--model", required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_lazy("aenode.evaluate:command_evaluate"))

    p = sub.add_parser("run", help="select, infer and write results for DICOM folders, offline")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_lazy("aenode.offline:command_run"))

    p = sub.add_parser("jobs", help="jobs with their state and per-stage times")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=_lazy("aenode.status:command_jobs"))

    p = sub.add_parser("retry", help="queue a failed job's export (or the whole job) again")
    p.add_argument("job", type=int)
    p.set_defaults(handler=_lazy("aenode.status:command_retry"))
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
    except ConfigError as exc:
        print(f"aenode: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
