"""The antonym prompts and the preprocessing constants: the one home of both (docs/method.md, "The model and the score")."""

from __future__ import annotations

# Positive first; the order of these pairs is the order of `prompt_features` rows
# (pos1, neg1, pos2, neg2, ...), as in the official checkpoint.
PROMPT_PAIRS: tuple[tuple[str, str], ...] = (
    ("Good photo.", "Bad photo."),
    ("Sharp image.", "Blurry image."),
    ("Sharp edges.", "Blurry edges."),
    ("High-resolution image.", "Low-resolution image."),
    ("Noise-free image.", "Noisy image."),
    ("High-quality image.", "Low-quality image."),
    ("Good picture.", "Bad picture."),
)

# CLIP-IQA-style single pair used for the zero-shot baseline of the untrained backbone.
BASELINE_PAIRS: tuple[tuple[str, str], ...] = (("Good photo.", "Bad photo."),)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def flat_prompts(pairs: tuple[tuple[str, str], ...] = PROMPT_PAIRS) -> list[str]:
    """The prompts in checkpoint row order: pos1, neg1, pos2, neg2, ..."""
    return [p for pair in pairs for p in pair]
