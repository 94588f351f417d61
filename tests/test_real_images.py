"""Pretraining on a real image set that a package ships: the trained teacher must not be worse than
the random-init backbone it started from (k-NN top-1, k=20, on a fixed held-out split), with the SEM
read at the evaluation's tau (1e-5) and at the training tau.

scikit-learn's digits (1,797 8 x 8 handwritten digits, 10 classes) are written as a 56 px ImageFolder
by ``benchmarks/real_images/datasets.py``. With the demo recipe as it was (DINOv2's local crops of
5-32% of the image, prototypes trained from the second epoch, LayerNorm SEM), DINO's CLS loss fell to
the uniform prediction (cross-entropy ln K) within ~100 iterations and the teacher ended below the
random init. The 10-point margin over 3 seeds is a benchmark (benchmarks/RESULTS.md), not this test.

Measured (seed 0, 240 iterations, the recipe of this branch): teacher 29.2% against 30.4% at tau 1e-5,
60.7% against 65.7% at the training tau, so the test fails and is marked xfail until a recipe learns.
"""

import sys
from pathlib import Path

import pytest

from semlab.config import load_config
from semlab.eval.knn_report import FinalKnn, knn_accuracy, random_init_backbone, sem_temperature
from semlab.train.pretraining import run_pretraining

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.real_images.datasets import export  # noqa: E402

BRIEF = ["optim.epochs=4", "evaluation.eval_period_iterations=240", "evaluation.linear_after_train=false"]


@pytest.mark.slow
@pytest.mark.xfail(
    reason="issue 12 is open: the small-scale recipe beat its random init on digits for seed 0 at 720 "
    "iterations only (benchmarks/RESULTS.md); after 240 iterations the teacher is still below it",
    strict=False,
)
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
    assert top1["knn_top1_teacher"] >= top1["knn_top1_random_init"], top1  # tau 1e-5
    random_init = random_init_backbone(cfg)
    with sem_temperature(random_init, float(cfg.student.temp)):
        random_train_tau = knn_accuracy(cfg, random_init, "cls", "cpu")[20]["top1"]
    assert top1["knn_top1_teacher_train_tau"] >= random_train_tau, (top1, random_train_tau)
