"""The pipeline's identity score is the evaluation's identity measure, and a missing metric is logged."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
from make_bad_inputs import synthetic_face
from PIL import Image, ImageFilter

from dynface.evaluation import score_faces
from dynface.metrics.arrays import resize_u8
from dynface.metrics.identity import ID_SIZE, descriptor_pair
from tasks.score import identity_scorer, similarity_or_none


def test_score_stage_measures_identity_on_the_evaluations_upsampled_faces() -> None:
    face = synthetic_face(64)
    blurred = np.asarray(Image.fromarray(face).filter(ImageFilter.GaussianBlur(1.5)))
    scorer = identity_scorer()
    value = similarity_or_none(scorer, blurred, face)
    # The same descriptors as the evaluation's identity distance: both faces upsampled to ID_SIZE.
    pair = descriptor_pair(resize_u8(blurred, ID_SIZE), resize_u8(face, ID_SIZE), None)
    assert pair is not None and value is not None
    cosine = float(pair[0] @ pair[1] / (np.linalg.norm(pair[0]) * np.linalg.norm(pair[1])))
    assert value == pytest.approx(cosine, abs=1e-9)
    distance = score_faces([blurred], [face])["identity_distance"].iloc[0]
    assert distance == pytest.approx(float(np.linalg.norm(pair[0] - pair[1])), abs=1e-9)


def test_a_missing_identity_metric_is_logged_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "dynface.metrics.identity", None)  # the import now fails
    with caplog.at_level(logging.WARNING, logger="tasks.score"):
        assert identity_scorer() is None
    assert "identity_similarity will be null" in caplog.text and "ModuleNotFoundError" in caplog.text
