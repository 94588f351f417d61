"""Ray Tune sweep over the SEM hyperparameters ``student.L`` x ``student.temp`` (a TorchTrainer per trial).

    python experiments/sweep.py --L 8 16 --temp 0.5 1.0 --output-dir outputs/sweep train.max_iterations=60

Trials run one after another by default (``--max-concurrent``); each is a full pretraining of the
config (default: the demo) with its own output dir ``<output-dir>/L<L>_temp<tau>`` and MLflow run.
The printed table ranks the trials by the teacher's k-NN top-1 (or by the final loss when the config
has no k-NN datasets). Rerunning the same command resumes unfinished trials from their checkpoints.
"""

from __future__ import annotations

import argparse
import sys

from semlab.config import ConfigError, load_config
from semlab.eval.eval_datasets import resolve_eval_datasets
from semlab.orchestration.cluster import ClusterError, connect
from semlab.orchestration.tune import default_metric, run_sweep, summarize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="train/demo_tiny", help="recipe name or YAML path")
    p.add_argument("--output-dir", default="outputs/sweep", help="one sub-directory per trial")
    p.add_argument("--L", type=int, nargs="+", default=[8, 16], help="values of student.L (simplices)")
    p.add_argument("--temp", type=float, nargs="+", default=[0.5, 1.0], help="values of student.temp (tau)")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials running at the same time")
    p.add_argument("--metric", default=None, help="metric to rank by (default: knn_top1_teacher or total)")
    p.add_argument("--mode", choices=("max", "min"), default=None, help="max or min of --metric")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config_file, args.overrides)
        print(resolve_eval_datasets(cfg))
        handle = connect(cfg)
    except (ConfigError, ClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        metric, mode = args.metric or default_metric(cfg)[0], args.mode or default_metric(cfg)[1]
        results = run_sweep(
            cfg,
            args.output_dir,
            args.L,
            args.temp,
            max_concurrent_trials=args.max_concurrent,
        )
        rows = summarize(results, metric, mode)
    finally:
        if handle.started:
            handle.shutdown()
    print(f"{'student.L':>10} {'student.temp':>12} {metric:>20}  error")
    for row in rows:
        value = row[metric]
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{row['student.L']:>10} {row['student.temp']:>12} {shown:>20}  {row['error'] or ''}")
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
