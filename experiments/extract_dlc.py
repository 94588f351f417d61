"""Export the discrete latent codes (DLC) of a SEM teacher over a dataset:

    python experiments/extract_dlc.py --config-file eval/vitl14_L512 \
        --pretrained-weights <OUT>/eval/training_24999/teacher_checkpoint.pth \
        --dataset ImageNet:split=VAL:root=<DATA>:extra=<DATA> --output <DIR> [key=value ...]

Writes ``<DIR>/codes.parquet`` (columns index, label, codes: L uint16 values in [0, V)),
``<DIR>/code_usage.json`` and ``<DIR>/code_usage.png``, and prints the code-usage summary.
Images get the reference extraction's transform: CenterCrop ``linear.crop_size`` (224) of the image
as it is, without the 256 resize, and the codes are computed in float32.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="eval/vitl14_L512", help="recipe name or YAML path")
    p.add_argument("--pretrained-weights", default="", help="teacher_checkpoint.pth (or backbone weights)")
    p.add_argument("--dataset", required=True, help="dataset string, e.g. Demo:split=VAL or Parquet:path=...")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from semlab.config import ConfigError, load_config
    from semlab.eval.linear import resolve_recipe

    try:
        cfg = load_config(resolve_recipe(args.config_file), list(args.overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from semlab.data import make_dataset
    from semlab.eval.dlc import export_dlc, make_dlc_transform
    from semlab.eval.linear import build_eval_backbone
    from semlab.utils.output_dirs import ensure_writable_dir

    try:
        ensure_writable_dir(args.output, "--output")  # before the model and the whole dataset run
        crop = int(cfg.linear.crop_size)
        dataset = make_dataset(args.dataset, transform=make_dlc_transform(crop))
        backbone = build_eval_backbone(cfg, args.pretrained_weights or None)
        if not getattr(backbone, "has_sem", False):
            raise ValueError(f"the model of {args.config_file} has no SEM (student.L = 0): it has no codes")
        export_dlc(backbone, dataset, args.output, batch_size=args.batch_size, num_workers=args.num_workers,
                   device=args.device, progress=not args.no_progress,
                   metadata={"checkpoint": args.pretrained_weights, "dataset": args.dataset,
                             "arch": cfg.student.arch, "tau_train": cfg.student.temp,
                             "transform": f"CenterCrop({crop}), no resize, float32 (the reference's)"})
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
