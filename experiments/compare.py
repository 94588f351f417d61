"""Comparison chart of an experiment's pretraining runs from MLflow (same as ``semlab report``):

    python experiments/compare.py [--tracking-uri URI | --output-root outputs] [--experiment semlab]
        [--output docs/images/compare.png] [--metrics linear_sem_top1 linear_top1 knn_top1_k20]
"""

from __future__ import annotations

import sys

from semlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
