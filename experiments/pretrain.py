"""Pretrain DINOv2(+SEM): ``python experiments/pretrain.py [--config-file R] [--output-dir D] [k=v ...]``.

With no arguments it trains the embedded demo (``train/demo_tiny``) through Ray Train on a local
Ray cluster that it starts (or on the cluster it was submitted to with ``ray job submit``), then
prints the k-NN top-1 of the trained teacher, of the random-init backbone and of raw pixels.
``--local`` trains in this process without Ray. Flags: ``python experiments/pretrain.py --help``;
the logic lives in :mod:`semlab.orchestration.launch`.
"""

from __future__ import annotations

import sys

from semlab.orchestration.launch import main

if __name__ == "__main__":
    sys.exit(main())
