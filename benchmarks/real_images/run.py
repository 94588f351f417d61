"""One measured pretraining run on a real image set (or the demo), for the issue-12 benchmark.

``python benchmarks/real_images/run.py --data digits --seed 0 --out DIR [key=value ...]``
pretrains ``train/demo_tiny`` (+ overrides) in this process (``run_pretraining``, no Ray), then
runs ``knn_report`` on the last teacher checkpoint (``knn_results.json``: teacher CLS and SEM raw
at ``evaluation.sem_temp`` = 1e-5, teacher CLS at the training tau, random init at 1e-5, raw
pixels; k-NN top-1 at k=20 on the fixed val split) and adds the measures of issue 12:

- ``random_init_train_tau``: the random init's CLS at the training tau (the issue's reading);
- ``teacher_sem_raw_tau_train``: the raw simplex at the training tau;
- ``teacher_avgpool`` / ``random_avgpool``: the mean normed patch token;
- ``random_init_layernorm[_train_tau]`` (``student.sem_norm=batch`` only): the random init with the
  reference's LayerNorm SEM instead, a stricter baseline than a BatchNorm whose running statistics
  are (0, 1), at tau 1e-5 and at the training tau;
- code usage on the val split: per simplex l, the number of vertices that are the argmax of at
  least one image, and the entropy ``H_l = -sum_v p_lv log2 p_lv`` of the argmax histogram p_l
  (bits, max log2 V); reported as means over the L simplices.

Writes ``<out>/measures.json`` with the wall time of the pretraining and of the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from semlab.config import load_config
from semlab.eval.features import extract_features
from semlab.eval.knn import knn_classify
from semlab.eval.knn_report import knn_report, random_init_backbone, sem_temperature
from semlab.models import build_model_from_cfg, load_weights
from semlab.train.pretraining import run_pretraining

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.real_images.datasets import LOADERS, export  # noqa: E402

DATA_ROOT = "/tmp/semlab_real_images"
DEMO = ("Demo:split=TRAIN", "Demo:split=VAL")


def dataset_strings(name: str) -> tuple[str, str]:
    return DEMO if name == "demo" else export(name, DATA_ROOT)


def code_usage(codes: torch.Tensor, V: int) -> dict[str, float]:
    """Mean over simplices of the vertices used and of the argmax entropy (bits); codes (N, L)."""
    used, ent = [], []
    for col in codes.T:
        p = torch.bincount(col, minlength=V).float() / col.numel()
        used.append(int((p > 0).sum()))
        nz = p[p > 0]
        ent.append(float(-(nz * nz.log2()).sum()))
    return {
        "vertices_used": sum(used) / len(used),
        "entropy_bits": sum(ent) / len(ent),
        "max_bits": math.log2(V),
    }


def measures(cfg, teacher: torch.nn.Module) -> dict:
    train_ds, val_ds = str(cfg.evaluation.knn_dataset_train), str(cfg.evaluation.knn_dataset_val)
    common = dict(
        batch_size=256, resize_size=int(cfg.linear.resize_size), crop_size=int(cfg.linear.crop_size)
    )

    def knn(model, kind, **kw):
        (xtr, ytr), (xva, yva) = (
            extract_features(model, ds, kind=kind, **common, **kw) for ds in (train_ds, val_ds)
        )
        return knn_classify(xtr, ytr, xva, yva, nb_knn=[20])[20]["top1"]

    out = {
        "teacher_avgpool": knn(teacher, "avgpool"),
        "random_avgpool": knn(random_init_backbone(cfg), "avgpool"),
    }
    if getattr(teacher, "has_sem", False):
        tau = float(cfg.student.temp)
        random_init = random_init_backbone(cfg)
        with sem_temperature(random_init, tau):
            out["random_init_train_tau"] = knn(random_init, "cls")
        if cfg.student.sem_norm == "batch":
            # the BatchNorm's running statistics of a fresh model are (0, 1): also give the random
            # init of the LayerNorm SEM, whose logits are normalised, as the stricter baseline
            ln = cfg.copy()
            ln.student.sem_norm = "layer"
            random_ln = random_init_backbone(ln)
            with sem_temperature(random_ln, tau):
                out["random_init_layernorm_train_tau"] = knn(random_ln, "cls")
            with sem_temperature(random_ln, float(cfg.evaluation.sem_temp)):
                out["random_init_layernorm"] = knn(random_ln, "cls")
        out["teacher_sem_raw_tau_train"] = knn(teacher, "sem", sem_temp=tau)
        from semlab.data import make_dataset
        from semlab.eval.features import make_eval_transform

        ds = make_dataset(val_ds, transform=make_eval_transform(common["resize_size"], common["crop_size"]))
        loader = torch.utils.data.DataLoader(ds, batch_size=256)
        with torch.no_grad():
            codes = torch.cat([teacher.eval().dlc(x) for x, _ in loader])
        out["codes"] = code_usage(codes, int(cfg.student.V))
    return out


def use_old_sem_init() -> None:
    """Measure semlab's old SEM init: once a ViT is built, every ``sem_*`` Linear gets
    trunc_normal(0.02) weights and zero bias, like the rest of the ViT (a benchmark-only patch)."""
    from semlab.models import vit

    build = vit.DinoVisionTransformer.__init__

    def init(self, *args, **kwargs) -> None:
        build(self, *args, **kwargs)
        for name, module in self.named_modules():
            if name.startswith("sem_"):
                vit._init_linear(module)

    vit.DinoVisionTransformer.__init__ = init


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="digits", choices=["demo", *LOADERS])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--config-file", default="train/demo_tiny")
    p.add_argument(
        "--sem-init",
        choices=["default", "trunc_normal"],
        default="default",
        help="default: the SEM layers keep PyTorch's nn.Linear init (the reference, and semlab); "
        "trunc_normal: semlab's old init, trunc_normal(std 0.02) weights and zero bias (issue-12 suspect)",
    )
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.sem_init == "trunc_normal":
        use_old_sem_init()
    tr, va = dataset_strings(a.data)
    base = [
        f"train.dataset_path={tr}",
        f"evaluation.knn_dataset_train={tr}",
        f"evaluation.knn_dataset_val={va}",
        f"train.seed={a.seed}",
        "evaluation.linear_after_train=false",
    ]
    cfg = load_config(a.config_file, base + list(a.overrides))
    t0 = time.time()
    summary = run_pretraining(cfg, a.out, resume=False)
    t_train = time.time() - t0
    ckpts = sorted(
        Path(a.out, "eval").glob("training_*/teacher_checkpoint.pth"), key=lambda q: int(q.parent.name[9:])
    )
    teacher, _ = build_model_from_cfg(cfg, only_teacher=True)
    load_weights(teacher, str(ckpts[-1]))
    teacher.eval()
    report = knn_report(cfg, teacher, a.out)
    result = {
        "data": a.data,
        "seed": a.seed,
        "overrides": list(a.overrides),
        "command": " ".join(
            ["python benchmarks/real_images/run.py", *sys.argv[1:]] if argv is None else argv
        ),
        "top1_k20": report["top1"],
        "extra_k20": measures(cfg, teacher),
        "iterations": int(summary["iteration"]) + 1,
        "wall_s_train": round(t_train, 1),
        "wall_s_total": round(time.time() - t0, 1),
    }
    Path(a.out, "measures.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
