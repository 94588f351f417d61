"""Every command line checks its inputs and outputs before it computes: a bad value fails in a second,
with exit code 2 and a sentence naming it, not after the features were extracted or the probe trained."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from semlab.utils.output_dirs import OutputDirError, ensure_writable_dir

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def command(name: str):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder that cannot be created (its parent is a file): refused whoever runs the test, root too."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    return blocker / "out"


@pytest.fixture
def no_compute(monkeypatch):
    """Make model building fail loudly: the checks must stop the command before it."""
    import semlab.eval.linear as linear

    def forbidden(*args, **kwargs):
        raise AssertionError("computed before checking the inputs")

    monkeypatch.setattr(linear, "build_eval_backbone", forbidden)
    return forbidden


def test_ensure_writable_dir(tmp_path, unwritable):
    assert ensure_writable_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    assert ensure_writable_dir("s3://bucket/prefix") is None
    with pytest.raises(OutputDirError, match="--output-dir .*a_file/out is not writable"):
        ensure_writable_dir(unwritable)


def test_linear_refuses_an_unwritable_output_dir_before_computing(unwritable, no_compute, monkeypatch,
                                                                  capsys):
    cli = command("linear")
    monkeypatch.setattr(cli, "build_eval_backbone", no_compute)
    rc = cli.main(["--config-file", "train/demo_tiny", "--output-dir", str(unwritable),
                   "--train-dataset", "Demo:split=TRAIN:n_per_class=1",
                   "--val-dataset", "Demo:split=VAL:n_per_class=1"])
    assert rc == 2 and "not writable" in capsys.readouterr().err


def test_extract_dlc_refuses_an_unwritable_output_before_computing(unwritable, no_compute, capsys):
    args = ["--config-file", "train/demo_tiny", "--dataset", "Demo:split=VAL:n_per_class=1", "--output",
            str(unwritable)]
    rc = command("extract_dlc").main(args)
    assert rc == 2 and "--output" in capsys.readouterr().err


def test_knn_checks_the_val_dataset_before_extracting_features(tmp_path, no_compute, monkeypatch, capsys):
    cli = command("knn")
    monkeypatch.setattr(cli, "build_eval_backbone", no_compute)
    monkeypatch.setattr(cli, "knn_accuracy", no_compute)
    rc = cli.main(["--config-file", "train/demo_tiny", "--pretrained-weights", str(tmp_path / "w.pth"),
                   "--train-dataset", "Demo:split=TRAIN:n_per_class=1",
                   "--val-dataset", f"ImageFolder:root={tmp_path / 'no_such_folder'}"])
    assert rc == 2 and "no_such_folder" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--rows-per-shard", "0"], ["--workers", "0"], ["--shard-size-mb", "0"]])
def test_prepare_data_refuses_non_positive_sizes(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as info:
        command("prepare_data").main(["--dataset", "Demo:split=VAL:n_per_class=1", "--output",
                                      str(tmp_path / "shards"), *flags])
    assert info.value.code == 2 and flags[0] in capsys.readouterr().err
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").iterdir())


def test_pretrain_refuses_bad_values_before_starting(tmp_path, capsys):
    cli = command("pretrain")
    bad = (("student.L=abc", "student.L"), ("train.batch_size_per_gpu=0", "batch_size_per_gpu"),
           ("student.L=-1", "student.L"))
    for override, key in bad:
        assert cli.main(["--local", "--output-dir", str(tmp_path / "out"), override]) == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
