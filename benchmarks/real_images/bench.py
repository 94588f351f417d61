"""The issue-12 benchmark: the demo recipe on real image sets, several seeds, one table per dataset.

``python benchmarks/real_images/bench.py --data digits mnist5k demo --seeds 0 1 2 --out DIR [key=value ...]``

Runs ``run.py`` once per (dataset, seed), one after the other in fresh processes, then writes
``DIR/table.md``: per dataset and seed the k-NN top-1 (k=20) on the fixed val split of the trained
teacher's CLS output and of the random-init backbone (same architecture and seed; for a BatchNorm
SEM also the LayerNorm SEM's, the stricter baseline), each read with the SEM softmax at the training
tau and at the evaluation's tau 1e-5; raw pixels; the wall time; then the mean over seeds and the
teacher's margin over the best random init for each reading. ``--table-only`` rebuilds the table
from the runs already in DIR.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (column title, key in top1_k20 or extra_k20); "train tau" = the SEM softmax at student.temp
COLUMNS = (
    ("teacher, train tau", "teacher_train_tau"),
    ("random init, train tau", "random_init_train_tau"),
    ("random init LayerNorm SEM, train tau", "random_init_layernorm_train_tau"),
    ("teacher, tau 1e-5", "teacher"),
    ("random init, tau 1e-5", "random_init"),
    ("random init LayerNorm SEM, tau 1e-5", "random_init_layernorm"),
    ("raw pixels", "raw_pixels"),
)


def run_dir(out: Path, data: str, seed: int) -> Path:
    return out / f"{data}_seed{seed}"


def scores(run: dict) -> dict[str, float]:
    """All k-NN top-1 figures (k=20) of one run, by key; a model without SEM has one reading."""
    out = {**run["top1_k20"], **{k: v for k, v in run["extra_k20"].items() if isinstance(v, float)}}
    out.setdefault("teacher_train_tau", out["teacher"])
    out.setdefault("random_init_train_tau", out["random_init"])
    return out


def margin(mean: dict[str, float], teacher: str, randoms: tuple[str, ...]) -> float:
    return mean[teacher] - max(mean[r] for r in randoms if r in mean)


def table(out: Path, datasets: list[str], seeds: list[int]) -> str:
    lines = []
    for data in datasets:
        rows = [
            json.loads(f.read_text())
            for s in seeds
            if (f := run_dir(out, data, s) / "measures.json").is_file()
        ]
        if not rows:
            continue
        cols = [(t, k) for t, k in COLUMNS if all(k in scores(r) for r in rows)]
        lines += [
            f"**{data}**",
            "",
            "| seed | " + " | ".join(t for t, _ in cols) + " | wall |",
            "|---" * (len(cols) + 2) + "|",
        ]
        for r in rows:
            sc = scores(r)
            lines.append(
                f"| {r['seed']} | "
                + " | ".join(f"{sc[k]:.1f}" for _, k in cols)
                + f" | {r['wall_s_total'] / 60:.1f} min |"
            )
        mean = {k: sum(scores(r)[k] for r in rows) / len(rows) for _, k in cols}
        lines.append(f"| mean of {len(rows)} | " + " | ".join(f"**{mean[k]:.1f}**" for _, k in cols) + " | |")
        train = margin(
            mean, "teacher_train_tau", ("random_init_train_tau", "random_init_layernorm_train_tau")
        )
        ev = margin(mean, "teacher", ("random_init", "random_init_layernorm"))
        lines += [
            "",
            f"Teacher - best random init: **{train:+.1f} points** at the training tau, "
            f"**{ev:+.1f}** at tau 1e-5. Command (seed {rows[0]['seed']}): `{rows[0]['command']}`.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", nargs="+", default=["digits"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", required=True)
    p.add_argument("--table-only", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    out = Path(a.out)
    if not a.table_only:
        for data in a.data:
            for seed in a.seeds:
                d = run_dir(out, data, seed)
                if (d / "measures.json").is_file():
                    continue
                cmd = [
                    sys.executable,
                    str(HERE / "run.py"),
                    "--data",
                    data,
                    "--seed",
                    str(seed),
                    "--out",
                    str(d),
                ]
                subprocess.run(cmd + a.overrides, check=True)
    text = table(out, a.data, a.seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
