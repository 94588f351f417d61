"""Pretraining on a real image set that a package ships must learn there, not collapse.

scikit-learn's digits (1,797 8 x 8 handwritten digits, 10 classes) are written as a 56 px ImageFolder
by ``benchmarks/real_images/datasets.py``. With the demo recipe as it was (DINOv2's local crops of
5-32% of the image, prototypes trained from the second epoch), DINO's local cross-entropy fell to the
uniform prediction (ln K per term) within ~100 iterations and the teacher ended below its random init.
This test checks, after 240 iterations of ``train/demo_tiny``, that the run's own k-NN headline (SEM
read at the evaluation tau 1e-5, k=20, on the held-out split) is not below the random-init
backbone's read the same way (measured: 55.7% against 30.1%, seed 0; the SEM paper's BatchNorm
variant failed it, 29.2% against 30.4%).

What it does not show: the comparison at the training tau. After 240 iterations the teacher reads
63.0% there against the random init's 69.9% (seed 0); over 720 iterations and 3 seeds the margin is
+3.4 points (benchmarks/RESULTS.md, "Real images"), short of issue 12's +10, and the old recipe also
passed this test's reading (42.1% at 720 iterations). Issue 12 stays open.
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
    assert top1["knn_top1_teacher"] >= top1["knn_top1_random_init"], top1  # tau 1e-5, the headline
