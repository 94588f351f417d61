"""The ``semlab`` command.

    semlab report [--tracking-uri URI | --output-root DIR] [--experiment NAME] [--output PNG]
        draw the comparison chart of an experiment's pretraining runs (accuracy vs L and tau,
        loss curves) from MLflow; default output docs/images/compare.png
    semlab sync --output-dir RUN_DIR --to URI
        copy a run that was logged to the local fallback store (server down) to a tracking server
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from semlab.tracking.store import DEFAULT_DB_NAME, ENV_TRACKING_URI, redact_uri, sqlite_uri


def report_uri(tracking_uri: str | None, output_root: str) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else semlab's default store in ``output_root``."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get(ENV_TRACKING_URI):
        return os.environ[ENV_TRACKING_URI]
    db = Path(output_root) / DEFAULT_DB_NAME
    if not db.is_file():
        raise FileNotFoundError(
            f"no MLflow store found: {db} does not exist. Pass --tracking-uri, set {ENV_TRACKING_URI}, or "
            f"--output-root <the folder holding your run directories>"
        )
    return sqlite_uri(db)


def add_report_args(p: argparse.ArgumentParser) -> None:
    from semlab.tracking.compare import DEFAULT_ACCURACY_METRICS, DEFAULT_LOSS_METRIC

    p.add_argument("--tracking-uri", default=None, help=f"MLflow store (default: ${ENV_TRACKING_URI}, "
                   f"else <output-root>/{DEFAULT_DB_NAME})")
    p.add_argument("--output-root", default="outputs", help="folder of the run directories (default store)")
    p.add_argument("--experiment", default="semlab", help="MLflow experiment name (mlflow.experiment_name)")
    p.add_argument("--output", default="docs/images/compare.png", help="PNG to write")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_ACCURACY_METRICS),
                   help="accuracy metrics, first present wins per run")
    p.add_argument("--loss-metric", default=DEFAULT_LOSS_METRIC, help="metric history drawn as loss curve")


def cmd_report(args: argparse.Namespace) -> int:
    from semlab.tracking.compare import report

    try:
        uri = report_uri(args.tracking_uri, args.output_root)
        path, points = report(uri, args.experiment, args.output, args.metrics, args.loss_metric)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"compared {len(points)} runs of experiment '{args.experiment}' in {redact_uri(uri)}: {path}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from semlab.tracking.sync import sync_run

    try:
        new_id = sync_run(args.output_dir, args.to, source_uri=args.source)
    except (ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run of {args.output_dir} is in {redact_uri(args.to)} as {new_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="comparison chart of an experiment's runs")
    add_report_args(rep)
    rep.set_defaults(func=cmd_report)
    syn = sub.add_parser("sync", help="copy a fallback-logged run to a tracking server")
    syn.add_argument("--output-dir", required=True, help="pretraining output dir (has mlflow_run.json)")
    syn.add_argument("--to", required=True, help="target tracking URI, e.g. http://mlflow:5000")
    syn.add_argument("--source", default=None, help="source store (default: the one in mlflow_run.json)")
    syn.set_defaults(func=cmd_sync)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
