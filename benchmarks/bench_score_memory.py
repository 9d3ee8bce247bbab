"""Memory of scoring one large image: measured peak against the estimate `scoring.image_problem` uses.

Each row is a fresh process that builds a model (random weights, no download), scores one random
image of the given size on the CPU, and reports the peak of its anonymous resident memory
(polled every millisecond from /proc/self/status; file-backed pages are left out because the
kernel may drop them) above what it held just before, in bytes per input pixel, next to
`scoring.bytes_per_pixel`. The estimate must not be below the measurement: the memory budget
(`--max-memory-gb`) is only a promise if it covers what scoring takes. Linux only. Usage:

    python benchmarks/bench_score_memory.py                          # tiny and small at 4 and 9 MP
    python benchmarks/bench_score_memory.py --models RN50 --sizes 3000x3000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, threading, time, numpy as np, torch
from qualiclip.model import ModelConfig, create_model
from qualiclip.scoring import bytes_per_pixel, inference_copy, score_arrays
name, h, w, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))
scorer = inference_copy(create_model(ModelConfig(name=name)))
image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
score_arrays(scorer, [image[:64, :64]])
before, peak, done = anon(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
thread = threading.Thread(target=watch)
thread.start()
t = time.perf_counter()
score_arrays(scorer, [image])
seconds = time.perf_counter() - t
done.set()
thread.join()
print(json.dumps({"measured": (peak[0] - before) / (h * w), "estimated": bytes_per_pixel(scorer), "s": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qualiclip-tiny-rn", "qualiclip-small-rn"])
    ap.add_argument("--sizes", nargs="+", default=["2048x2048", "3000x3000"], help="HxW")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print("| model | size | MP | measured B/px | estimated B/px | estimate / measured | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for size in args.sizes:
            h, w = (int(v) for v in size.split("x"))
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, name, str(h), str(w), str(args.threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"| {name} | {size} | {h * w / 1e6:.1f} | {r['measured']:.1f} | {r['estimated']:.1f} | "
                f"{r['estimated'] / r['measured']:.2f} | {r['s']:.1f} |"
            )


if __name__ == "__main__":
    main()
