"""Test hook (put on PYTHONPATH by tests/test_pipeline_dvc.py): in a process that DVC runs as a stage
(``DVC_STAGE`` set) and ``QUALICLIP_STAGE_LOG`` names a folder, append to ``<folder>/<stage>.txt``,
at exit, the files under ``./qualiclip`` that the process imported (its modules) or opened as data
(files other than Python source: e.g. the model configs). Source files merely opened, not
imported, are left out: MLflow copies the whole package into a logged model."""

import atexit
import os
import sys
from pathlib import Path

_LOG, _STAGE = os.environ.get("QUALICLIP_STAGE_LOG"), os.environ.get("DVC_STAGE")

if _LOG and _STAGE:
    _code = Path.cwd() / "qualiclip"
    _opened: set[str] = set()

    def _audit(event: str, args: tuple) -> None:
        if (
            event == "open"
            and isinstance(args[0], str)
            and args[0].startswith(str(_code))
            and not args[0].endswith((".py", ".pyc"))
        ):
            _opened.add(args[0])

    def _dump() -> None:
        files = _opened | {getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}
        rel = sorted(
            {
                Path(f).resolve().relative_to(Path.cwd()).as_posix()
                for f in files
                if f and Path(f).resolve().is_relative_to(_code) and Path(f).is_file()
            }
        )
        with open(Path(_LOG) / f"{_STAGE.rsplit(':', 1)[-1]}.txt", "a") as fh:
            fh.write("\n".join(rel) + "\n")

    sys.addaudithook(_audit)
    atexit.register(_dump)
