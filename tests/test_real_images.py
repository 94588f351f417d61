"""Pretraining on a real image set that a package ships must learn there, not collapse.

scikit-learn's digits (1,797 8 x 8 handwritten digits, 10 classes) are written as a 56 px ImageFolder
by ``benchmarks/real_images/datasets.py``. With the demo recipe as it was (DINOv2's local crops of
5-32% of the image, prototypes trained from the second epoch), DINO's local cross-entropy fell to the
uniform prediction (ln K per term) within ~100 iterations and the teacher ended below its random init.
This test checks, after 240 iterations of ``train/demo_tiny``, that the run's own k-NN headline (SEM
read at the evaluation tau 1e-5, k=20, on the held-out split) is at least ``MARGIN`` points above the
random-init backbone's read the same way. The CPU run is deterministic; measured on 2026-12-02 (seed 0):
today's recipe 55.7% against 30.1% (+25.6); the recipe as it was (DINOv2's crops, prototypes trained
from the second epoch) 45.1% against 30.1% (+15.0), so the test tells the two apart, and fails if the
run stops learning at all.

What it does not show: the comparison at the training tau (after 240 iterations 63.0% against the
random init's 69.9%, and 57.1% for the old recipe), nor the issue's 3-seed margin, which belongs in
``benchmarks/real_images/bench.py`` (benchmarks/RESULTS.md, "Real images").
"""

import sys
from pathlib import Path

import pytest

from semlab.config import load_config
from semlab.eval.knn_report import FinalKnn
from semlab.train.pretraining import run_pretraining

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.real_images.datasets import export  # noqa: E402

MARGIN = 20.0  # points of k-NN top-1; today's recipe +25.6, the old one +15.0 (see above)
BRIEF = ["optim.epochs=4", "evaluation.eval_period_iterations=240", "evaluation.linear_after_train=false"]


@pytest.mark.slow
def test_teacher_not_worse_than_random_init_on_digits(tmp_path) -> None:
    train, val = export("digits", tmp_path / "data")
    cfg = load_config(
        "train/demo_tiny",
        [
            *BRIEF,
            f"train.dataset_path={train}",
            f"evaluation.knn_dataset_train={train}",
            f"evaluation.knn_dataset_val={val}",
        ],
    )
    knn = FinalKnn(cfg, tmp_path / "run")
    top1 = run_pretraining(cfg, tmp_path / "run", resume=False, evaluate=knn)["final_metrics"]
    # tau 1e-5, the headline reading
    assert top1["knn_top1_teacher"] >= top1["knn_top1_random_init"] + MARGIN, top1
