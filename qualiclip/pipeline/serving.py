"""A pyfunc model so ``mlflow models serve -m models:/qualiclip@champion`` answers with scores.

Input: a DataFrame (or JSON ``dataframe_records``) with a column ``image`` (base64-encoded image
bytes) or ``path`` (a file readable by the server). Output: one ``score`` per row.
"""
from __future__ import annotations

import base64
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from ..checkpoint import load_checkpoint
from ..imageio import decode_image, read_image
from ..scoring import inference_copy, score_arrays

# The qualiclip package folder: logged with the model, so the server imports this module from it.
PACKAGE_DIR = Path(__file__).resolve().parents[1]


class QualiCLIPPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        # the scoring copy (folded BatchNorm, no text tower) once, not on every request
        self.model = inference_copy(load_checkpoint(context.artifacts["checkpoint"]))

    def predict(self, context, model_input, params=None):
        if "image" in model_input.columns:
            images = [decode_image(base64.b64decode(b)).pixels for b in model_input["image"]]
        elif "path" in model_input.columns:
            images = [read_image(Path(p)).pixels for p in model_input["path"]]
        else:
            raise ValueError("input needs a column 'image' (base64 bytes) or 'path'")
        return pd.DataFrame({"score": score_arrays(self.model, images)})


def requirements() -> list[str]:
    names = ["torch", "torchvision", "open_clip_torch", "safetensors", "numpy", "pillow", "opencv-python-headless", "pandas"]
    return [f"{n}=={version(n)}" for n in names]


def log_pyfunc(checkpoint_dir: Path, registered_model_name: str | None):
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=QualiCLIPPyfunc(),
        artifacts={"checkpoint": str(checkpoint_dir)},
        pip_requirements=requirements(),
        code_paths=[str(PACKAGE_DIR)],
        registered_model_name=registered_model_name,
    )
