"""The training loop: exact resume, corrupt-checkpoint fallback, non-finite loss, eval checkpoints."""

import itertools
import json

import pytest
import torch
from synthetic_batches import TINY_SSL, synthetic_batch

from semlab.config import load_config
from semlab.models import build_backbone, load_weights
from semlab.train.checkpointing import (
    checkpoint_path,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint_file,
)
from semlab.train.loop import METRICS_FILE, NonFiniteLossError, do_train
from semlab.train.meta_arch import SSLMetaArch
from semlab.train.pretraining import seed_everything
from semlab.train.reporting import ListReporter

TINY = [
    *TINY_SSL,
    "train.OFFICIAL_EPOCH_LENGTH=3",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
    "train.log_period_iterations=1",
    "train.checkpoint_period_iterations=2",
    "evaluation.eval_period_iterations=0",
    "optim.base_lr=0.05",
    "evaluation.knn_dataset_train=",
    "evaluation.knn_dataset_val=",
]


def tiny_cfg(*overrides):
    return load_config("train/demo_tiny", TINY + list(overrides))


def batch_at(cfg, it, b=4):
    """A deterministic synthetic batch for iteration ``it``."""
    return synthetic_batch(cfg, seed=1000 + it, b=b)


def data_factory(cfg, fail_at=None, nan_at=None):
    def make(start):
        for it in itertools.count(start):
            if it == fail_at:
                raise RuntimeError("simulated crash")
            batch = batch_at(cfg, it)
            if it == nan_at:
                batch["collated_global_crops"] = torch.full_like(batch["collated_global_crops"], float("nan"))
            yield batch

    return make


def build(cfg):
    seed_everything(0)
    return SSLMetaArch(cfg)


def full_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_resume_after_crash_ends_with_identical_weights(tmp_path):
    # drop path and softmax centering exercise the RNG and the loss-center state
    over = ["student.drop_path_rate=0.2", "train.centering=centering"]
    cfg = tiny_cfg(*over)
    ref = build(cfg)
    summary = do_train(cfg, ref, data_factory(cfg), tmp_path / "ref")
    assert summary["iteration"] == 5

    cfg2 = tiny_cfg(*over)
    crashed = build(cfg2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        do_train(cfg2, crashed, data_factory(cfg2, fail_at=5), tmp_path / "run")
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [1, 3]
    seed_everything(123)  # a fresh process: other seeds, fresh model
    resumed = SSLMetaArch(tiny_cfg(*over))
    rep = ListReporter()
    summary = do_train(tiny_cfg(*over), resumed, data_factory(cfg2), tmp_path / "run", reporter=rep)
    assert summary["start_iteration"] == 4 and summary["iteration"] == 5
    a, b = full_state(ref), full_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log holds every iteration exactly once, with the schedule values
    lines = [json.loads(x) for x in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(6))
    for key in (
        "total",
        "dino_local_crops_loss",
        "ibot_loss",
        "koleo_loss",
        "lr",
        "wd",
        "mom",
        "teacher_temp",
        "images_per_s",
    ):
        assert key in lines[-1]
    assert [it for it, _ in rep.metrics] == [4, 5] and rep.checkpoints[-1][0] == 5 and rep.summary is not None


@pytest.mark.slow
def test_corrupt_last_checkpoint_falls_back_with_a_warning(tmp_path):
    cfg = tiny_cfg()
    do_train(cfg, build(cfg), data_factory(cfg), tmp_path)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [1, 3, 5]  # max_to_keep 3
    last = checkpoint_path(tmp_path, 5) / "trainer_state.pt"
    last.write_bytes(last.read_bytes()[:100])  # truncated
    with pytest.warns(RuntimeWarning, match="falling back to model_0000003"):
        path, ckpt = find_resume_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 3) and ckpt["iteration"] == 3
    assert ckpt["data"] == {"consumed_iterations": 4, "seed": cfg.train.seed, "world_size": 1}
    with pytest.warns(RuntimeWarning):
        summary = do_train(tiny_cfg(), build(cfg), data_factory(cfg), tmp_path)
    assert summary["start_iteration"] == 4
    load_checkpoint_file(checkpoint_path(tmp_path, 5))  # rewritten, loads again


@pytest.mark.slow
def test_max_to_keep(tmp_path):
    cfg = tiny_cfg("train.max_to_keep=2", "train.checkpoint_period_iterations=1")
    do_train(cfg, build(cfg), data_factory(cfg), tmp_path)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert (tmp_path / "checkpoints" / "last_checkpoint").read_text().strip() == "model_0000005"


def test_non_finite_loss_stops_without_a_new_checkpoint(tmp_path):
    cfg = tiny_cfg()
    model = build(cfg)
    with pytest.raises(NonFiniteLossError, match="iteration 3") as info:
        do_train(cfg, model, data_factory(cfg, nan_at=3), tmp_path)
    assert info.value.iteration == 3 and "total" in info.value.losses
    assert info.value.checkpoint == checkpoint_path(tmp_path, 1)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [1]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no step was taken
    path, _ = find_resume_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 1)


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [0, 2])
def test_eval_checkpoints_load_into_a_fresh_teacher(tmp_path, chunks):
    cfg = tiny_cfg("evaluation.eval_period_iterations=2", f"student.block_chunks={chunks}")
    model = build(cfg)
    rep = ListReporter()
    do_train(cfg, model, data_factory(cfg), tmp_path, reporter=rep)
    assert [it for it, _ in rep.eval_checkpoints] == [1, 3, 5]
    path = tmp_path / "eval" / "training_5" / "teacher_checkpoint.pth"
    assert (path.parent / "config.yaml").is_file()
    ckpt = torch.load(path, weights_only=True)
    assert list(ckpt) == ["teacher"]
    keys = set(ckpt["teacher"])
    assert {k.split(".")[0] for k in keys} == {"backbone", "dino_head"}
    assert ("backbone.blocks.1.1.attn.qkv.weight" in keys) == bool(chunks)
    fresh = build_backbone(
        "vit_tiny",
        embed_dim=24,
        depth=2,
        num_heads=2,
        img_size=28,
        patch_size=14,
        num_register_tokens=2,
        init_values=1e-5,
        L=4,
        V=4,
    )
    load_weights(fresh, path)
    trained = model.teacher.backbone.state_dict()
    fresh_sd = fresh.state_dict()
    blk = "blocks.1.1" if chunks else "blocks.1"
    assert torch.equal(fresh_sd["blocks.1.attn.qkv.weight"], trained[f"{blk}.attn.qkv.weight"])
    assert torch.equal(fresh_sd["sem_embed.weight"], trained["sem_embed.weight"])
    x = torch.randn(2, 3, 28, 28)
    fresh.eval()
    torch.testing.assert_close(
        fresh.forward_features(x)["x_norm_clstoken"],
        model.teacher.backbone.forward_features(x)["x_norm_clstoken"],
    )


@pytest.mark.slow
def test_model_weights_start_from_a_teacher_checkpoint(tmp_path):
    cfg = tiny_cfg("evaluation.eval_period_iterations=6")
    model = build(cfg)
    do_train(cfg, model, data_factory(cfg), tmp_path / "a")
    teacher_ckpt = tmp_path / "a" / "eval" / "training_5" / "teacher_checkpoint.pth"
    cfg2 = tiny_cfg(f"MODEL.pretrained_backbone={teacher_ckpt}", "train.max_iterations=1")
    fresh = build(cfg2)
    rep = ListReporter()
    do_train(cfg2, fresh, data_factory(cfg2), tmp_path / "b", reporter=rep)
    first = json.loads((tmp_path / "b" / METRICS_FILE).read_text().splitlines()[0])
    assert first["iteration"] == 0
    # after one step with lr 0 (warmup starts at 0) the teacher is still the loaded one
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(fresh.teacher.state_dict()[k], v, msg=k)


# ----------------------------------------------------------------------------- the real data pipeline
def demo_cfg(root, *overrides):
    ds = f"Demo:split=TRAIN:root={root}:n_per_class=4"
    return tiny_cfg(
        f"train.dataset_path={ds}", "train.num_workers=0", "train.batch_size_per_gpu=8", *overrides
    )


@pytest.mark.slow
def test_resume_with_the_demo_data_iterator_is_exact(tmp_path):
    from semlab.data import make_local_data_iterator

    def factory(cfg, fail_at=None):
        def make(start):
            batches = make_local_data_iterator(cfg, 0, 1, start_iter=start)
            for it in itertools.count(start):
                if it == fail_at:
                    raise RuntimeError("simulated crash")
                yield next(batches)

        return make

    root = tmp_path / "demo"
    cfg = demo_cfg(root)
    ref = build(cfg)
    do_train(cfg, ref, factory(cfg), tmp_path / "ref")
    cfg2 = demo_cfg(root)
    with pytest.raises(RuntimeError, match="simulated crash"):
        do_train(cfg2, build(cfg2), factory(cfg2, fail_at=3), tmp_path / "run")
    seed_everything(7)
    resumed = SSLMetaArch(demo_cfg(root))
    summary = do_train(demo_cfg(root), resumed, factory(cfg2), tmp_path / "run")
    assert summary["start_iteration"] == 2
    a, b = full_state(ref), full_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.mlflow
def test_pretrain_entry_point_writes_config_metrics_and_knn(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("pretrain_entry", path)
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    root = tmp_path / "demo"
    # no evaluation.knn_dataset_*: the evaluation follows train.dataset_path to its VAL split
    train, val = (f"Demo:split={s}:root={root}:n_per_class=4" for s in ("TRAIN", "VAL"))
    # --local: the single-process path (the Ray path is tested in test_ray_train / test_job_submit_e2e)
    args = ["--output-dir", str(tmp_path / "out"), "--local", "train.num_workers=0"]
    args += TINY + [
        f"train.dataset_path={train}",
        "train.batch_size_per_gpu=8",
        "knn.nb_knn=[5]",
        "linear.resize_size=32",
        "linear.crop_size=28",
        "linear.epochs=1",
        "linear.epoch_length=2",
        "evaluation.eval_period_iterations=2",
    ]
    assert entry.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"evaluation on {val} (train/bank: {train}), following train.dataset_path" in lines
    where = f"k-NN top-1 (k=5, on {val})"
    assert [x.rsplit(": ", 1)[0] for x in lines[-7:]] == [
        f"{where} trained teacher, raw SEM simplices at tau=1e-05",
        f"{where} trained teacher, CLS with SEM at the training tau=1.0",
        f"{where} trained teacher, CLS with SEM at tau=1e-05",
        f"{where} random-init backbone, same reading",
        f"{where} raw pixels",
        "linear probe on CLS tokens",
        "linear probe on raw SEM simplices",
    ]
    assert lines[-1].endswith(f"on {val}")
    out = tmp_path / "out"
    report = json.loads((out / "knn_results.json").read_text())
    names = {"teacher", "teacher_sem_raw", "teacher_train_tau", "random_init", "raw_pixels"}
    assert set(report["top1"]) == names
    assert report["val_dataset"] == val and report["sem_temp"] == 1e-5 and report["train_sem_temp"] == 1.0
    assert all(0.0 <= v <= 100.0 for v in report["top1"].values())
    saved = load_config(out / "config.yaml")
    assert saved.train.output_dir == str(out) and saved.optim.lr > 0
    assert (out / METRICS_FILE).is_file() and (out / "checkpoints" / "last_checkpoint").is_file()
    assert entry.main(["--nodes", "0", "--output-dir", str(out)]) == 2  # bad worker flags are refused


@pytest.mark.slow
def test_interrupted_sharded_write_is_never_resumed_from(tmp_path):
    """A checkpoint folder whose DCP ``.metadata`` is missing (a crash while the shards were being
    written) is skipped even when ``last_checkpoint`` names it; its shards are per rank."""
    cfg = tiny_cfg("train.max_iterations=4")
    do_train(cfg, build(cfg), data_factory(cfg), tmp_path)
    last = checkpoint_path(tmp_path, 3)
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "trainer_state.pt"]
    (last / ".metadata").unlink()
    with pytest.warns(RuntimeWarning, match=r"no DCP \.metadata.*falling back to model_0000001"):
        path, state = find_resume_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 1) and state["iteration"] == 1


@pytest.mark.slow
def test_model_weights_start_from_a_full_checkpoint_folder(tmp_path):
    cfg = tiny_cfg("train.max_iterations=4")
    model = build(cfg)
    do_train(cfg, model, data_factory(cfg), tmp_path / "a")
    fresh = build(tiny_cfg(f"MODEL.pretrained_backbone={checkpoint_path(tmp_path / 'a', 3)}"))
    for part in ("student", "teacher"):  # both as saved (the teacher is the EMA, not a copy)
        for k, v in getattr(model, part).state_dict().items():
            torch.testing.assert_close(getattr(fresh, part).state_dict()[k], v, msg=f"{part}.{k}")
