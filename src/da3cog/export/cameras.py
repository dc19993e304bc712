"""Cameras as JSON: per view the image name, size, K, world-to-camera and camera-to-world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from da3cog.export.files import write_atomically
from da3cog.geometry import invert_rigid_np
from da3cog.pipeline import Prediction

CONVENTIONS = {
    "axes": "OpenCV: x right, y down, z forward",
    "extrinsics": "world_to_camera 4x4; camera_to_world is its inverse",
    "intrinsics": "pixels of the view's width x height, pixel centres at +0.5",
    "depth": "z along the optical axis",
}


def cameras_document(prediction: Prediction) -> dict:
    """The cameras JSON document as a dict."""
    world = "the user's input frame" if prediction.pose_conditioned else "camera of the first view"
    return {
        "model": {"id": prediction.model_id, "preset": prediction.model_preset},
        "conventions": {
            **CONVENTIONS,
            "world_frame": world,
            "units": "metres" if prediction.is_metric else "relative (scale shared by all views)",
        },
        "is_metric": prediction.is_metric,
        "output_resolution": prediction.output_resolution,
        "processing_size": {
            "height": prediction.processing_size[0],
            "width": prediction.processing_size[1],
        },
        "notes": list(prediction.notes),
        "views": [
            {
                "index": index,
                "name": view.name,
                "width": view.width,
                "height": view.height,
                "K": np.asarray(view.intrinsics, dtype=float).tolist(),
                "world_to_camera": np.asarray(view.extrinsics, dtype=float).tolist(),
                "camera_to_world": invert_rigid_np(
                    np.asarray(view.extrinsics, dtype=float)
                ).tolist(),
            }
            for index, view in enumerate(prediction.views)
        ],
    }


def export_cameras_json(prediction: Prediction, folder: Path) -> Path:
    """Write ``cameras.json``."""
    text = json.dumps(cameras_document(prediction), indent=2)
    return write_atomically(folder / "cameras.json", lambda target: target.write_text(text))
