"""Ray Tune sweep of pretrainings: a sweep file (any config key, ASHA, random or Optuna search), or the
``--L/--temp`` grid shorthand.

    python experiments/sweep.py --config-file train/demo_tiny --sweep experiments/sweeps/demo.yaml \
        --output-dir outputs/sweep_demo
    python experiments/sweep.py --L 8 16 --temp 0.5 1.0 --output-dir outputs/sweep train.max_iterations=60

Each trial is a full pretraining of the config with its own output dir ``<output-dir>/<trial>`` and
MLflow run, a child of the sweep's parent run (store: ``<output-dir>/mlflow.db`` unless
``mlflow.tracking_uri`` or MLFLOW_TRACKING_URI say otherwise). The teacher's in-training k-NN
(``accuracy/knn_top1``, every ``evaluation.eval_period_iterations``) is what ASHA stops trials by.
At the end: the ranked table, ``<output-dir>/<sweep name>_trials.csv`` and ``..._results.png``.
Rerunning the same command restores the sweep: finished and early-stopped trials are not rerun.
"""

from __future__ import annotations

import argparse
import sys

from semlab.config import ConfigError, load_config
from semlab.eval.eval_datasets import resolve_eval_datasets
from semlab.orchestration.cluster import ClusterError, connect
from semlab.orchestration.sweep_results import write_sweep_results
from semlab.orchestration.sweep_spec import (
    SweepSpecError,
    grid_spec,
    parse_sweep_spec,
    read_sweep_file,
    spec_yaml,
    sweep_overrides,
)
from semlab.orchestration.tune import run_sweep


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="train/demo_tiny", help="recipe name or YAML path")
    p.add_argument("--sweep", default=None, help="sweep file (YAML, see experiments/sweeps/demo.yaml)")
    p.add_argument("--output-dir", default="outputs/sweep", help="one sub-directory per trial")
    p.add_argument("--L", type=int, nargs="+", default=[8, 16], help="grid shorthand: values of student.L")
    p.add_argument("--temp", type=float, nargs="+", default=[0.5, 1.0], help="grid shorthand: student.temp")
    p.add_argument("--max-concurrent", type=int, default=1, help="grid shorthand: trials at the same time")
    p.add_argument("--name", default="sem_sweep", help="grid shorthand: the sweep's name")
    p.add_argument("--metric", default=None, help="grid shorthand: metric (default accuracy/knn_top1)")
    p.add_argument("--mode", choices=("max", "min"), default=None, help="max or min of --metric")
    p.add_argument("--no-mlflow", action="store_true", help="no MLflow parent and child runs")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        raw, text = read_sweep_file(args.sweep) if args.sweep else (None, "")
        cfg = load_config(args.config_file, [*sweep_overrides(raw), *args.overrides])
        print(resolve_eval_datasets(cfg))
        if args.sweep:
            spec = parse_sweep_spec(raw, cfg, text)
        else:
            spec = grid_spec(args.L, args.temp, name=args.name, max_concurrent_trials=args.max_concurrent)
            spec.metric, spec.mode = args.metric or spec.metric, args.mode or spec.mode
            spec.text = spec_yaml(spec)
        handle = connect(cfg)
    except (ConfigError, ClusterError, SweepSpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parent = None
    try:
        if not args.no_mlflow and bool(cfg.mlflow.enabled):
            from semlab.tracking.sweep_parent import open_sweep_parent

            settings = {
                "num_samples": spec.num_samples,
                "scheduler": spec.scheduler,
                "metric": spec.metric,
                "search_alg": spec.search_alg,
                "mode": spec.mode,
                "recipe": args.config_file,
            }
            parent = open_sweep_parent(
                cfg, args.output_dir, spec.name, spec.text, spec.search_space, settings
            )
        results = run_sweep(
            cfg, args.output_dir, spec=spec, mlflow=parent is not None,
            parent_run_id=parent.run_id if parent is not None else None,
        )  # fmt: skip
        rows, csv_path, png_path = write_sweep_results(
            results, spec.metric, spec.mode, args.output_dir, spec.name, list(spec.search_space)
        )
        if parent is not None:
            from semlab.tracking.sweep_parent import finish_sweep_parent

            finish_sweep_parent(parent, rows, spec.metric, [csv_path, png_path])
    except SweepSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if handle.started:
            handle.shutdown()
    keys = list(spec.search_space)
    print(
        "  ".join(
            [f"{'trial':>28}", *(f"{k:>14}" for k in keys), f"{spec.metric:>20}", f"{'stop':>14}", "error"]
        )
    )
    for row in rows:
        value = row[spec.metric]
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        cells = [f"{row['trial']:>28}", *(f"{str(row[k]):>14}" for k in keys), f"{shown:>20}"]
        print("  ".join([*cells, f"{row['stop_reason']:>14}", row["error"] or ""]))
    print(f"results: {csv_path} and {png_path}")
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
