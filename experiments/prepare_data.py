"""Write Parquet shards of a dataset for Ray Data streaming (and the ``Parquet:`` dataset string).

    python experiments/prepare_data.py --dataset "ImageNet:root=/data/imagenet:extra=/data/imagenet-extra" \\
        --output /data/imagenet-shards --splits TRAIN VAL --workers 8

On a Ray cluster (``--ray``; run it with ``ray job submit --entrypoint-num-cpus 1 -- python ...``)
the shards are Ray Data work spread over every node's CPUs, the autoscaling CPU group included:

    python experiments/prepare_data.py --ray --dataset "ImageNet:root=...:extra=..." \
        --output gs://BUCKET/imagenet-shards --splits TRAIN VAL --workers 128

Rerunning with the same arguments resumes: finished shards (checked by sha256) are kept, missing or damaged
ones are rewritten, and the manifest is written last. See docs/data.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semlab.data.datasets.shards import ensure_imagenet_extra, prepare_shards  # noqa: E402
from semlab.utils.output_dirs import OutputDirError, ensure_writable_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="source dataset string, e.g. 'ImageNet:root=<dir>:extra=<dir>', 'ImageFolder:root=<dir>', "
        "'Demo:split=TRAIN'",
    )
    parser.add_argument(
        "--output", required=True, help="output folder or URI (file://, s3://bucket/prefix, gs://...)"
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=None,
        help="splits to write (TRAIN VAL ...); default: the string's split=, else TRAIN",
    )
    parser.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (default 256)")
    parser.add_argument(
        "--rows-per-shard", type=int, default=None, help="exact rows per shard (overrides the size)"
    )
    parser.add_argument(
        "--workers", type=int, default=None,
        help="parallel writers: processes (default 1), or with --ray the most Ray Data actors (default: "
        "one per CPU of the cluster)",
    )
    parser.add_argument("--ray", action="store_true", help="run the shards as Ray Data work on a Ray cluster")
    parser.add_argument(
        "--address", default="auto", help="with --ray: the cluster to join ('auto'), or 'local' to start one"
    )
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="with --ray: CPUs per actor")
    parser.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        help="seed of the fixed sample order written to the shards (default 0)",
    )
    parser.add_argument("--no-shuffle", action="store_true", help="write samples in dataset order")
    parser.add_argument(
        "--extra",
        action="store_true",
        help="ImageNet: only (re)build the extra metadata (entries-*.npy ...) and stop; it is built "
        "automatically before sharding when missing",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    for flag, value in (("--rows-per-shard", args.rows_per_shard), ("--workers", args.workers)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if not args.shard_size_mb > 0:
        parser.error(f"--shard-size-mb must be > 0, got {args.shard_size_mb}")
    try:
        ensure_writable_dir(args.output, "--output")
    except OutputDirError as exc:
        parser.error(str(exc))
    if args.extra:
        ensure_imagenet_extra(args.dataset, force=True)
        return 0
    ensure_imagenet_extra(args.dataset)
    options = {
        "splits": args.splits,
        "shard_size_mb": args.shard_size_mb,
        "rows_per_shard": args.rows_per_shard,
        "shuffle_seed": None if args.no_shuffle else args.shuffle_seed,
        "progress": not args.no_progress,
    }
    if args.ray:
        from semlab.orchestration.shard_preparation import prepare_shards_on_ray

        manifest, runner = prepare_shards_on_ray(
            args.dataset, args.output, args.address, args.workers, args.cpus_per_worker, **options
        )
        logging.info("shards per Ray node: %s", dict(runner.nodes))
    else:
        manifest = prepare_shards(args.dataset, args.output, workers=args.workers or 1, **options)
    for split, entry in manifest["splits"].items():
        logging.info(
            "%s: %d samples in %d shards, %d skipped",
            split,
            entry["num_samples"],
            len(entry["shards"]),
            entry["skipped"]["count"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
