"""Faults and bad input that must never poison a run (docs/reliability.md lists each with its test).

Fast tests: credential redaction, config values named in their errors, the parameter health guard
(exploded weights never become the "last good" checkpoint), disk full, partial files, the tracking
server check with user info, unreadable images and symlink loops in the training data.
"""

from __future__ import annotations

import base64
import http.server
import io
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_loop import build, data_factory, tiny_cfg

from semlab.config import ConfigError, load_config, save_config
from semlab.config.checks import check_training_config
from semlab.data.datasets.image_folder import CorruptImageError, ImageFolder
from semlab.data.pipeline.augment import make_augmentation
from semlab.data.pipeline.loaders import AugmentedSamples
from semlab.tracking.store import check_reachable
from semlab.train import checkpointing
from semlab.train.checkpointing import (
    CheckpointWriteError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint_file,
    restore_checkpoint,
    save_checkpoint,
)
from semlab.train.health import DivergedModelError, first_unhealthy, model_problem, state_problem
from semlab.train.loop import NonFiniteLossError, do_train
from semlab.train.param_groups import build_optimizer
from semlab.utils.atomic import atomic_path
from semlab.utils.redact import redact_text, redact_tree

SECRETS = ("SIGsecret3", "HFsecret1", "PWsecret4", "TOKsecret11", "AMZsecret5")


# ---------------------------------------------------------------------------- secrets
def test_redaction_covers_query_secrets_userinfo_and_credential_keys():
    text = (
        "https://a.blob.core.windows.net/c?sv=1&sig=SIGsecret3 "
        "http://b:PWsecret4@127.0.0.1:9/?token=TOKsecret11 "
        "s3://bkt/o?X-Amz-Credential=AK&X-Amz-Signature=AMZsecret5&X-Amz-Date=1"
    )
    clean = redact_text(text)
    assert not any(s in clean for s in SECRETS), clean
    assert "sv=1" in clean and "X-Amz-Date=1" in clean and "127.0.0.1:9" in clean
    tree = redact_tree({"mlflow": {"tags": {"hf_token": "HFsecret1", "owner": "me"}},
                        "student": {"num_register_tokens": 4}, "paths": [text]})
    assert tree["mlflow"]["tags"] == {"hf_token": "***", "owner": "me"}
    assert tree["student"]["num_register_tokens"] == 4
    assert not any(s in str(tree) for s in SECRETS)


def test_saved_config_files_hold_no_secret(tmp_path):
    cfg = load_config("train/demo_tiny", [
        "ray.storage_path=https://a.blob.core.windows.net/c?sv=1&sig=SIGsecret3",
        "mlflow.tags.hf_token=HFsecret1",
        "mlflow.tracking_uri=http://b:PWsecret4@127.0.0.1:9/?token=TOKsecret11",
    ])
    text = save_config(cfg, tmp_path / "config.yaml").read_text()
    assert not any(s in text for s in SECRETS), text
    assert "hf_token: '***'" in text and "sv=1" in text
    assert "SIGsecret3" in cfg.ray.storage_path  # the running process keeps what it needs


# ---------------------------------------------------------------------------- bad config values
@pytest.mark.parametrize(("override", "named"), [
    ("student.L=abc", "student.L"),
    ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu"),
    ("student.L=-1", "student.L"),
    ("student.V=0", "student.V"),
    ("train.param_abs_limit=0", "train.param_abs_limit"),
])
def test_bad_config_values_are_refused_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        check_training_config(load_config("train/demo_tiny", [override]))


def test_typed_keys_still_take_numbers_and_interpolations(monkeypatch):
    monkeypatch.setenv("WT_SEMLAB_L", "8")
    cfg = load_config("train/demo_tiny", ["student.L=${oc.env:WT_SEMLAB_L,4}", "optim.base_lr=1e-3"])
    assert int(cfg.student.L) == 8 and cfg.optim.base_lr == 1e-3
    with pytest.raises(ConfigError, match="mlflow.enabled='maybe': expected true or false"):
        load_config("train/demo_tiny", ["mlflow.enabled=maybe"])


# ---------------------------------------------------------------------------- diverged parameters
def test_health_check_names_non_finite_and_exploded_tensors():
    good = {"student.w": torch.ones(3), "teacher.w": torch.ones(3), "dino_loss.center": torch.full((2,), 1e9)}
    assert first_unhealthy(good.items(), 1000.0) is None
    assert "student.w" in state_problem({**good, "student.w": torch.tensor([1.0, float("nan")])}, 1000.0)
    assert "3011" in state_problem({**good, "teacher.w": torch.tensor([3011.0])}, 1000.0)


@pytest.mark.slow
def test_huge_lr_never_leaves_a_diverged_last_good_checkpoint(tmp_path):
    # lr 1e6: one step leaves finite weights of ~3e4 (iteration 1), the next loss is NaN. The checkpoint
    # named "last good" must hold healthy weights, so that a rerun does not resume into the divergence.
    cfg = tiny_cfg("optim.base_lr=1e6", "train.checkpoint_period_iterations=1")
    with pytest.raises((DivergedModelError, NonFiniteLossError)) as info:
        do_train(cfg, build(cfg), data_factory(cfg), tmp_path)
    assert isinstance(info.value, DivergedModelError) and "param_abs_limit" in str(info.value)
    assert info.value.checkpoint == checkpoint_path(tmp_path, 0)
    limit = float(cfg.train.param_abs_limit)
    for _, path in list_checkpoints(tmp_path):
        model = build(cfg)
        restore_checkpoint(model, None, path)
        assert model_problem(model, limit) is None, path


def test_resume_skips_a_diverged_checkpoint_and_removes_partial_files(tmp_path):
    cfg = tiny_cfg()
    do_train(cfg, build(cfg), data_factory(cfg), tmp_path)  # checkpoints at iterations 1, 3, 5
    # a diverged checkpoint at iteration 7 (as an older semlab without the guard could write it)
    model = build(cfg)
    optimizer = build_optimizer(model.get_params_groups(), cfg)
    restore_checkpoint(model, optimizer, checkpoint_path(tmp_path, 5))
    with torch.no_grad():
        for p in model.student.parameters():
            p.mul_(1e6)
    save_checkpoint(model, optimizer, 7, tmp_path, tiny_cfg("train.max_to_keep=0"))
    assert (tmp_path / "checkpoints" / "last_checkpoint").read_text().strip() == "model_0000007"
    interrupted = checkpoint_path(tmp_path, 9)  # what a kill -9 during a write leaves: no .metadata
    interrupted.mkdir()
    partial = interrupted / ".trainer_state.pt.x1y2.tmp"
    partial.write_bytes(b"\0" * 4096)
    with pytest.warns(RuntimeWarning, match="diverged weights") as caught:
        summary = do_train(tiny_cfg("train.max_iterations=7"), build(cfg), data_factory(cfg), tmp_path)
    assert any("falling back to model_0000005" in str(w.message) for w in caught)
    assert summary["start_iteration"] == 6 and not partial.exists()


def test_resume_refuses_when_every_checkpoint_is_diverged(tmp_path):
    cfg = tiny_cfg("train.max_iterations=2", "train.max_to_keep=0")
    do_train(cfg, build(cfg), data_factory(cfg), tmp_path)  # one checkpoint, at iteration 1
    with pytest.warns(RuntimeWarning, match="diverged weights"), pytest.raises(DivergedModelError,
                                                                                match="--no-resume"):
        do_train(tiny_cfg("train.param_abs_limit=1e-9"), build(cfg), data_factory(cfg), tmp_path)


# ---------------------------------------------------------------------------- disk full
def test_disk_full_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    real_save = checkpointing.dcp.save
    calls = {"n": 0}

    def full_disk_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint: the OS's own wording when the disk fills up
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpointing.dcp, "save", full_disk_save)
    with pytest.raises(CheckpointWriteError, match="disk may be full") as info:
        do_train(cfg, build(cfg), data_factory(cfg), tmp_path)
    assert "model_0000003" in str(info.value) and "MiB free" in str(info.value)
    monkeypatch.setattr(checkpointing.dcp, "save", real_save)
    complete = [it for it, path in list_checkpoints(tmp_path) if (path / ".metadata").is_file()]
    assert complete == [1]
    load_checkpoint_file(checkpoint_path(tmp_path, 1))
    assert (tmp_path / "checkpoints" / "last_checkpoint").read_text().strip() == "model_0000001"
    with atomic_path(tmp_path / "x.bin") as tmp:  # the helper is unchanged: success still renames
        tmp.write_bytes(b"ok")
    assert (tmp_path / "x.bin").read_bytes() == b"ok"


# ---------------------------------------------------------------------------- tracking URI with user info
def test_tracking_server_with_user_and_password_is_reached(tmp_path):
    expected = "Basic " + base64.b64encode(b"b:PWsecret4").decode()
    seen: list[str] = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(f"{self.path} {self.headers.get('Authorization')}")
            ok = self.path == "/health" and self.headers.get("Authorization") == expected
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        uri = f"http://b:PWsecret4@127.0.0.1:{port}/?token=TOKsecret11"
        assert check_reachable(uri, timeout=5) == (True, "ok")
        ok, reason = check_reachable(f"http://b:wrong@127.0.0.1:{port}", timeout=5)
        assert not ok and "401" in reason and "wrong" not in reason
    finally:
        server.shutdown()
        server.server_close()
    assert seen[0].startswith("/health ")


# ---------------------------------------------------------------------------- training images
def png(size: tuple[int, int], colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (colour, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(root: Path, per_class: int = 5) -> Path:
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png((32, 32), 20 * i + c))
    return root


def test_symlink_loops_and_links_to_other_classes_are_followed_once(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)
    (root / "a" / "up").symlink_to(root, target_is_directory=True)
    (root / "b" / "to_a").symlink_to(root / "a", target_is_directory=True)
    (root / "extra").mkdir()
    (root / "extra" / "x.png").write_bytes(png((32, 32), 7))
    (root / "b" / "more").symlink_to(root / "extra", target_is_directory=True)
    ds = ImageFolder(root)
    assert ds.class_ids == ["a", "b", "extra"]
    assert len(ds) == 5 + 5 + 1, ds._relpaths  # 20 images must not become hundreds
    names = [ds.class_ids[label] for label in ds.labels]
    assert all(Path(rel).parts[0] == name for rel, name in zip(ds._relpaths, names))


def augmented_samples(root: Path, max_bad_fraction: float, max_image_pixels: int | None = None):
    cfg = load_config("train/demo_tiny", ["crops.global_crops_size=28", "crops.local_crops_size=14",
                                          "crops.local_crops_number=1"])
    return AugmentedSamples(ImageFolder(root), make_augmentation(cfg), seed=0,
                            max_bad_fraction=max_bad_fraction, max_image_pixels=max_image_pixels)


def test_unreadable_training_images_are_skipped_named_and_counted(tmp_path, caplog):
    root = image_folder(tmp_path / "imgs")
    (root / "a" / "0.png").write_bytes(b"")  # empty
    (root / "a" / "1.png").write_bytes(png((32, 32), 1)[:60])  # truncated
    (root / "b" / "0.png").write_bytes(png((400, 400), 3))  # 160k pixels: over the limit below
    samples = augmented_samples(root, max_bad_fraction=0.5, max_image_pixels=50_000)
    with caplog.at_level(logging.WARNING):
        got = [samples[(i, 0, i)] for i in range(len(samples))]
    assert [index for _, _, index, _ in got] == list(range(10))  # every key answered
    assert sorted(samples.bad) == [0, 1, 5]
    for name in ("a/0.png", "a/1.png", "b/0.png"):
        assert name in caplog.text
    assert "DecompressionBomb" in samples.bad[5]
    crops, label, _, _ = got[0]  # sample 0 was replaced by the next readable one (index 2, class a)
    assert label == 0 and crops["global_crops"][0].shape[-1] == 28
    assert np.isfinite(crops["global_crops"][0].numpy()).all()


def test_too_many_unreadable_images_stop_the_run_naming_them(tmp_path):
    root = image_folder(tmp_path / "imgs")
    for i in range(3):
        (root / "a" / f"{i}.png").write_bytes(b"not an image")
    samples = augmented_samples(root, max_bad_fraction=0.2)
    with pytest.raises(CorruptImageError, match="max_bad_image_fraction") as info:
        for i in range(len(samples)):
            samples[(i, 0, i)]
    assert "a/0.png" in str(info.value) and "a/2.png" in str(info.value)


# ---------------------------------------------------------------------------- kill -9 mid-checkpoint
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
import torch.distributed.checkpoint as dcp
sys.path.insert(0, {tests!r})
from test_train_loop import build, data_factory, tiny_cfg
from semlab.train.loop import do_train

real_save, calls = dcp.save, []

def dying_save(state, *args, checkpoint_id=None, **kwargs):
    calls.append(checkpoint_id)
    if len(calls) == 2:  # the second checkpoint: part of a shard reaches the disk, then SIGKILL
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(state, *args, checkpoint_id=checkpoint_id, **kwargs)

dcp.save = dying_save
cfg = tiny_cfg()
do_train(cfg, build(cfg), data_factory(cfg), {out!r})
"""


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_checkpoint_resumes_exactly(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [it for it, _ in list_checkpoints(out)] == [1, 3]
    assert not (checkpoint_path(out, 3) / ".metadata").exists()  # the half-written checkpoint
    cfg = tiny_cfg()
    ref = build(cfg)
    do_train(cfg, ref, data_factory(cfg), tmp_path / "ref")
    resumed = build(tiny_cfg())
    summary = do_train(tiny_cfg(), resumed, data_factory(cfg), out)  # last_checkpoint names model_0000001
    assert summary["start_iteration"] == 2 and summary["iteration"] == 5
    assert (checkpoint_path(out, 3) / ".metadata").is_file()  # rewritten whole
    for (key, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
