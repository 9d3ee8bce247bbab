"""``qualiclip explain IMAGE --out map.png``: the quality map of one image as a picture (and CSV)."""

from __future__ import annotations

from pathlib import Path

from ..explain import QualityMap, quality_map, render_quality_map, write_patch_csv
from ..imageio import DEFAULT_MAX_PIXELS, read_image
from .score_cli import ModelOptions, check_out_file, open_scorer


def run_explain(
    image_path: str | Path,
    out: Path,
    opts: ModelOptions,
    *,
    patch: int = 224,
    stride: int = 112,
    batch_size: int = 8,
    csv_out: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> QualityMap:
    """Score every window of the image, draw the map to ``out`` (and the patch scores to ``csv_out``)."""
    for flag, path in (("--out", out), ("--csv", csv_out)):
        if path:
            check_out_file(Path(path), flag)
    image = read_image(image_path, max_pixels=max_pixels, option="--max-pixels").pixels
    qmap = quality_map(
        open_scorer(opts)[0],
        image,
        patch=patch,
        stride=stride,
        batch_size=batch_size,
        device=opts.device,
        precision=opts.precision,
        max_memory=opts.max_memory,
    )
    out = render_quality_map(qmap, image, Path(out), stride=stride, name=Path(image_path).name)
    if csv_out:
        write_patch_csv(qmap, Path(csv_out))
    y, x, worst = qmap.worst()
    print(
        f"quality {qmap.global_score:.4f}; {qmap.scores.size} patches of {qmap.patch}px, "
        f"worst {worst:.4f} at x={x}, y={y} -> {out}"
    )
    return qmap
