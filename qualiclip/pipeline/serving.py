"""A pyfunc model so ``mlflow models serve -m models:/qualiclip@champion`` answers with scores.

Input: a DataFrame (JSON ``dataframe_records``/``dataframe_split``) with a column ``image``
(base64-encoded image bytes) or ``path`` (a file under the folder the server's
``QUALICLIP_SERVE_ROOT`` names, relative to it; without that variable the column is refused,
so a client cannot make the server read its files). Output: per row a
``score`` in [0, 1] (higher is better) and an ``error``, empty when the row was scored. A row
that cannot be scored (not base64, not an image, no such file, a path outside the root, over
the decompression-bomb limit) gets its reason and no score, and the other rows are still scored; a request with
neither column is refused with an error that names them.

Logged as *models from code*: MLflow stores `pyfunc_model.py` (which only builds
`QualiCLIPPyfunc`) with the checkpoint and this package, so nothing is pickled. The model
carries a signature (the columns above) and an input example (one small photo).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import skimage.data
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from ..batching import score_arrays
from ..file_scoring import score_paths
from ..imageio import ImageReadError, PathOutsideRootError, decode_image, resolve_inside
from ..inference import load_scorer

# The qualiclip package folder: logged with the model, so the server imports this module from it.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
SERVE_ROOT_ENV = "QUALICLIP_SERVE_ROOT"  # the folder whose files the `path` column may name
INPUT_COLUMNS = {"image": "base64-encoded image bytes", "path": f"a file under the server's {SERVE_ROOT_ENV}"}
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", name, required=False) for name in INPUT_COLUMNS]),
    outputs=Schema([ColSpec("double", "score", required=False), ColSpec("string", "error", required=False)]),
)


class QualiCLIPPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        # the scoring copy (image encoder only, folded BatchNorm) once, not on every request
        self.model = load_scorer(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One ``score`` (None where the row failed) and ``error`` per input row, in input order."""
        column = input_column(model_input)
        values = list(model_input[column])
        if column == "path":
            results = self._score_files(values)
        else:
            results = self._score_encoded(values)
        scores, errors = zip(*results) if results else ((), ())
        # object columns: a missing value stays None, which the server writes as JSON null (NaN is not JSON)
        return pd.DataFrame({"score": pd.Series(scores, dtype=object), "error": pd.Series(errors, dtype=object)})

    def _score_files(self, values: list) -> list[tuple[float | None, str | None]]:
        resolved = resolve_paths(values)
        ok = [i for i, r in enumerate(resolved) if isinstance(r, Path)]
        scored = dict(zip(ok, score_paths([str(resolved[i]) for i in ok], self.model))) if ok else {}
        return [
            (scored[i].score, scored[i].error or None) if i in scored else (None, resolved[i])  # type: ignore[misc]
            for i in range(len(values))
        ]  # not scored: resolved[i] is the error text

    def _score_encoded(self, values: list) -> list[tuple[float | None, str | None]]:
        decoded = [_decode_row(i, v) for i, v in enumerate(values)]
        ok = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        # the rows in ok decoded to arrays, the others to their error text
        scores = dict(zip(ok, score_arrays(self.model, [decoded[i] for i in ok]).tolist())) if ok else {}  # type: ignore[misc]
        return [(scores[i], None) if i in scores else (None, decoded[i]) for i in range(len(values))]  # type: ignore[misc]


def input_column(frame: pd.DataFrame) -> str:
    """``image`` or ``path``: the one of the two the request has; a clear refusal otherwise."""
    have = [c for c in INPUT_COLUMNS if c in frame.columns and frame[c].notna().any()]
    if len(have) != 1:
        wanted = " or ".join(f"'{c}' ({what})" for c, what in INPUT_COLUMNS.items())
        raise MlflowException.invalid_parameter_value(
            f"qualiclip needs one input column, {wanted}; the request has {'both' if have else 'neither'}"
        )
    return have[0]


def resolve_paths(values: list) -> list[Path | str]:
    """Each ``path`` row as a file under ``$QUALICLIP_SERVE_ROOT`` (symlinks resolved), or why not.

    The request is refused as a whole when the variable is unset: the server then reads no files.
    """
    root = os.environ.get(SERVE_ROOT_ENV)
    if not root:
        raise MlflowException.invalid_parameter_value(
            f"the 'path' column is off on this server: send 'image' (base64), or start the server with "
            f"{SERVE_ROOT_ENV}=<folder> to score files under that folder"
        )
    out: list[Path | str] = []
    for index, value in enumerate(values):
        if not isinstance(value, str) or not value:
            out.append(f"row {index}: no path")
            continue
        try:
            out.append(resolve_inside(root, value))
        except PathOutsideRootError:
            out.append(f"row {index}: {value!r} is outside {SERVE_ROOT_ENV}")
        except ImageReadError as exc:  # a symlink loop
            out.append(f"row {index}: {exc.reason}: {exc.detail}")
    return out


def _decode_row(index: int, value) -> np.ndarray | str:
    """The RGB pixels of one base64 image, or why the row cannot be scored."""
    if not isinstance(value, str) or not value:
        return f"row {index}: no image (expected a base64 string)"
    try:
        return decode_image(base64.b64decode(value, validate=True)).pixels
    except (binascii.Error, ValueError):
        return f"row {index}: not base64"
    except ImageReadError as exc:
        return f"row {index}: {exc.reason}: {exc.detail}"


def input_example() -> pd.DataFrame:
    """One request row as a client sends it: a 96x96 crop of scikit-image's astronaut, PNG, base64."""
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[40:232:2, 160:352:2]).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})


def requirements() -> list[str]:
    names = [
        "torch",
        "torchvision",
        "open_clip_torch",
        "safetensors",
        "numpy",
        "pillow",
        "opencv-python-headless",
        "pandas",
        "scikit-image",
    ]
    return [f"{n}=={version(n)}" for n in names]


def model_name(checkpoint_dir: Path) -> str:
    """The logged model's name: what it is, a QualiCLIP of the checkpoint's backbone
    (``qualiclip-tiny-rn``, ``qualiclip-RN50``), so a run's models are told apart in the MLflow UI."""
    from ..checkpoint import read_config

    arch = read_config(Path(checkpoint_dir))[0].name
    return arch if arch.lower().startswith("qualiclip") else f"qualiclip-{arch}"


def log_pyfunc(checkpoint_dir: Path):
    """Log ``checkpoint_dir`` as the pyfunc model of the active run, named by `model_name`;
    returns MLflow's ``ModelInfo``."""
    return mlflow.pyfunc.log_model(
        name=model_name(checkpoint_dir),
        python_model=str(MODEL_CODE),
        artifacts={"checkpoint": str(checkpoint_dir)},
        signature=SIGNATURE,
        input_example=input_example(),
        pip_requirements=requirements(),
        code_paths=[str(PACKAGE_DIR)],
    )
