"""Where does an evaluation's synthetic ranking fall short? Per type, and mean_shift by exposure.

Reads an evaluate output folder (``synthetic_scores.csv``) and rebuilds the same synthetic set
from the ingest folder it was scored on (same ``--split``, ``--crop`` and ``--seed`` as the
evaluate stage), then prints:

1. per distortion type: pooled SRCC and the mean within-photo SRCC of the 5 levels, worst first;
2. for ``mean_shift`` (one random sign per photo, magnitude rising with the level): each photo's
   mean brightness, whether the shift moves it towards or away from mid-grey (0.5), and the
   SRCC of its 5 levels. A no-reference scorer sees only the shifted photo; darkening a bright
   photo makes it look more like a typical exposure, so its ranking there can invert.

    python benchmarks/synthetic_breakdown.py --eval /tmp/learn/final/eval \\
        --ingest /tmp/learn/ingest-d72df1d25a31 --split train
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", type=Path, required=True, help="an evaluate output folder")
    ap.add_argument("--ingest", type=Path, required=True, help="the ingest folder it evaluated")
    ap.add_argument("--split", default="val")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from scipy.stats import spearmanr

    from qualiclip.distortions import LEVELS
    from qualiclip.evaluate import EvaluateConfig, build_synthetic_set, synthetic_metrics

    with open(args.eval / "synthetic_scores.csv") as f:
        rows = list(csv.DictReader(f))
    scores = np.array([float(r["score"]) for r in rows])
    s = build_synthetic_set(args.ingest, EvaluateConfig(split=args.split, crop=args.crop, seed=args.seed))
    if [(r["image_id"], r["distortion"], int(r["level"])) for r in rows] != list(
        zip(s.image_ids, s.distortions, s.levels.tolist())
    ):
        raise SystemExit("the rebuilt synthetic set does not match synthetic_scores.csv: check --ingest/--split/--crop")
    m = synthetic_metrics(scores, s)
    print(f"{len(scores)} images: pooled SRCC {m['srcc']:.3f}, within-photo SRCC {m['srcc_within']:.3f}\n")
    print("| type | pooled SRCC | within-photo SRCC |\n|---|---|---|")
    for name in sorted(m["per_distortion_within"], key=m["per_distortion_within"].get):
        print(f"| {name} | {m['per_distortion'][name]:.3f} | {m['per_distortion_within'][name]:.3f} |")

    if "mean_shift" not in m["per_distortion"]:
        return
    print("\nmean_shift, one row per photo (mean: of the level-1 image, shifted by 0.03):")
    print("| photo | mean | shift | towards 0.5? | SRCC of 5 levels |\n|---|---|---|---|---|")
    towards: dict[bool, list[float]] = {True: [], False: []}
    index = {(i, d, int(lv)): k for k, (i, d, lv) in enumerate(zip(s.image_ids, s.distortions, s.levels))}

    def mean(image_id: str, level: int) -> float:
        """Mean brightness in [0, 1] of one photo's mean_shift image at ``level``."""
        return float(s.images[index[image_id, "mean_shift", level]].mean() / 255.0)

    for image_id in sorted(dict.fromkeys(s.image_ids), key=lambda i: mean(i, 1)):
        idx = [index[image_id, "mean_shift", level] for level in LEVELS]
        srcc = spearmanr(scores[idx], -s.levels[idx])[0]
        srcc = 0.0 if np.isnan(srcc) else float(srcc)
        mean1, mean5 = mean(image_id, 1), mean(image_id, 5)
        darker = mean5 < mean1
        to_mid = darker == (mean1 > 0.5)
        towards[to_mid].append(srcc)
        print(
            f"| {image_id} | {mean1:.3f} | {'darker' if darker else 'brighter'} | {'yes' if to_mid else 'no'} | {srcc:+.3f} |"
        )
    for key, label in ((False, "away from 0.5"), (True, "towards 0.5")):
        if towards[key]:
            print(f"shift {label}: {len(towards[key])} photos, mean SRCC {np.mean(towards[key]):+.3f}")


if __name__ == "__main__":
    main()
