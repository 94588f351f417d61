"""The data of a pretraining as MLflow dataset inputs: what each says, and a real SQLite store with them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from test_tracking import cfg_with, fresh_store, template_db  # noqa: F401 (fixture)

from semlab.tracking.dataset_inputs import EVALUATION, TRAINING, describe, run_datasets
from semlab.tracking.mlflow_reporter import MLflowReporter


def image_folder(root, classes=("a", "b"), n=3):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_each_dataset_once_per_context_and_its_digest_follows_the_content(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMLAB_CACHE", str(tmp_path / "cache"))
    folder = image_folder(tmp_path / "digits")
    train = f"ImageFolder:root={folder}:split=TRAIN"
    cfg = cfg_with("train.dataset_path=Demo:split=TRAIN", f"evaluation.knn_dataset_train={train}",
                   f"evaluation.knn_dataset_val=ImageFolder:root={folder}:split=VAL")  # fmt: skip
    # the in-training k-NN defaults to the same sets: no repeats
    assert run_datasets(cfg) == [
        ("Demo:split=TRAIN", TRAINING),
        (train, EVALUATION),
        (f"ImageFolder:root={folder}:split=VAL", EVALUATION),
    ]
    # (the sets as the entry points leave them: semlab.eval.eval_datasets.resolve_eval_datasets fills them)
    final = ["evaluation.knn_dataset_train=Demo:split=TRAIN", "evaluation.knn_dataset_val=Demo:split=VAL"]
    small = "Demo:split=VAL:n_per_class=5"
    during = run_datasets(cfg_with(*final, f"evaluation.knn_during_training_val={small}"))
    assert during == [("Demo:split=TRAIN", TRAINING), ("Demo:split=TRAIN", EVALUATION),
                      ("Demo:split=VAL", EVALUATION), (small, EVALUATION)]  # fmt: skip
    off = cfg_with(*final, f"evaluation.knn_during_training_val={small}", "evaluation.knn_during_training=0")
    assert (small, EVALUATION) not in run_datasets(off)

    item = describe(train, EVALUATION)
    assert item.name == "ImageFolder:root=digits:split=TRAIN" and item.source == str(folder.resolve())
    assert len(item.digest) == 8 and describe(train, EVALUATION) == item  # deterministic
    assert describe(f"ImageFolder:root={folder}:split=VAL", EVALUATION).digest != item.digest
    image_folder(folder, classes=("c",), n=1)  # one more image: another digest
    assert describe(train, EVALUATION).digest != item.digest

    demo = describe("Demo:split=TRAIN:n_per_class=4", TRAINING)
    assert demo.source == str((tmp_path / "cache" / "demo-v3").resolve())
    assert demo.digest != describe("Demo:split=TRAIN:n_per_class=5", TRAINING).digest
    with pytest.raises(ValueError, match="unknown dataset"):
        describe("Dmeo:split=TRAIN", TRAINING)


@pytest.mark.mlflow
def test_a_pretraining_run_holds_its_training_and_evaluation_data_once(tmp_path, template_db, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SEMLAB_CACHE", str(tmp_path / "cache"))
    uri = fresh_store(template_db, tmp_path / "mlflow.db")
    folder = image_folder(tmp_path / "digits")
    cfg = cfg_with(f"mlflow.tracking_uri={uri}", "train.dataset_path=Demo:split=TRAIN",
                   f"evaluation.knn_dataset_train=ImageFolder:root={folder}:split=TRAIN",
                   f"evaluation.knn_dataset_val=ImageFolder:root={folder}:split=VAL",
                   "evaluation.knn_during_training_val=Demo:split=VAL:n_per_class=5")  # fmt: skip
    out = tmp_path / "run"
    first = MLflowReporter(cfg, out)
    first.close()
    client = MlflowClient(uri)

    def inputs():
        found = client.get_run(first.run_id).inputs.dataset_inputs
        return sorted(
            (i.dataset.name, i.tags[0].value, i.dataset.digest, json.loads(i.dataset.source)) for i in found
        )

    logged = inputs()
    assert [(name, context) for name, context, _, _ in logged] == [
        ("Demo:split=TRAIN", TRAINING),
        ("Demo:split=VAL:n_per_class=5", EVALUATION),
        ("ImageFolder:root=digits:split=TRAIN", EVALUATION),
        ("ImageFolder:root=digits:split=VAL", EVALUATION),
    ]
    assert {json.dumps(src) for *_, src in logged} >= {json.dumps({"uri": str(folder.resolve())})}
    assert all(len(digest) == 8 for _, _, digest, _ in logged)
    # a resumed pretraining continues the run: the same inputs, not twice
    second = MLflowReporter(cfg, out)
    assert second.resumed and second.run_id == first.run_id
    second.close()
    assert inputs() == logged
