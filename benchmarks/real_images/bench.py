"""The issue-12 benchmark: the demo recipe on real image sets, several seeds, one table per dataset.

``python benchmarks/real_images/bench.py --data digits mnist5k demo --seeds 0 1 2 --out DIR [key=value ...]``

Runs ``run.py`` once per (dataset, seed), one after the other in fresh processes, then writes
``DIR/table.md``: per dataset and seed the k-NN top-1 (k=20) on the fixed val split of the trained
teacher's CLS output, its raw SEM simplex at tau=1e-5, the random-init backbone (same architecture
and seed; for a BatchNorm SEM also the LayerNorm SEM's), raw pixels, and the wall time; then the
mean over seeds and the teacher's margin over the best random init. ``--table-only`` rebuilds the
table from the runs already in DIR.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = ("teacher", "teacher_sem_raw", "random_init", "random_init_layernorm", "raw_pixels")


def scores(run: dict) -> dict[str, float]:
    """The run's k-NN top-1 (k=20) per column; ``random_init_layernorm`` only for a BatchNorm SEM."""
    out = dict(run["top1_k20"])
    if "random_init_layernorm" in run.get("extra_k20", {}):
        out["random_init_layernorm"] = run["extra_k20"]["random_init_layernorm"]
    return out


def run_dir(out: Path, data: str, seed: int) -> Path:
    return out / f"{data}_seed{seed}"


def table(out: Path, datasets: list[str], seeds: list[int]) -> str:
    lines = []
    for data in datasets:
        rows = []
        for seed in seeds:
            f = run_dir(out, data, seed) / "measures.json"
            if f.is_file():
                rows.append(json.loads(f.read_text()))
        if not rows:
            continue
        lines += [
            f"**{data}**",
            "",
            "| seed | teacher (CLS) | teacher SEM raw (tau 1e-5) | random init | random init, LayerNorm SEM "
            "| raw pixels | wall |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            t = scores(r)
            cells = [f"{t[c]:.1f}" if c in t else "-" for c in COLUMNS]
            lines.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {r['wall_s_total'] / 60:.1f} min |")
        have = [c for c in COLUMNS if all(c in scores(r) for r in rows)]
        mean = {c: sum(scores(r)[c] for r in rows) / len(rows) for c in have}
        margin = mean["teacher"] - max(mean[c] for c in have if c.startswith("random_init"))
        lines += [
            f"| mean of {len(rows)} | "
            + " | ".join(f"**{mean[c]:.1f}**" if c in mean else "-" for c in COLUMNS)
            + " | |",
            "",
            f"Teacher - best random init: **{margin:+.1f} points**. Command: `{rows[0]['command']}` "
            f"(seed {rows[0]['seed']}).",
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
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
