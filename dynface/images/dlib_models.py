"""Where dlib's model files are: the `face_recognition_models` package ships them (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def dlib_model_dir() -> Path:
    """Folder of the package's .dat files, found without importing it (its __init__ imports
    pkg_resources, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package face-recognition-models is not installed (it ships the dlib .dat models)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def dlib_model_path(name: str) -> str:
    """Path of one model file, e.g. `shape_predictor_5_face_landmarks.dat`; a missing file raises."""
    path = dlib_model_dir() / name
    if not path.is_file():
        raise RuntimeError(f"dlib model missing: {path}")
    return str(path)
