"""The whole :class:`Prediction` as one ``.npz`` bundle, and back.

Per-pixel maps: ``depth`` ``(N, H, W)`` float32, ``confidence``, ``images`` ``(N, H, W, 3)``
uint8 and ``sky`` (bool, models with a sky head) when all views have one size; otherwise
``depth_0000``, ``confidence_0000``, ``image_0000``, ``sky_0000``... per view (``layout`` says
which). Maps a model does not predict are absent (``has_confidence``, ``has_sky``).

Cameras: ``extrinsics`` ``(N, 4, 4)`` world-to-camera (OpenCV), ``intrinsics`` ``(N, 3, 3)``;
views without them (single-view models) hold NaN there and False in ``has_extrinsics`` /
``has_intrinsics`` ``(N,)``.

Per view: ``names``, ``input_sizes`` ``(N, 2)`` (height, width), ``crop_boxes`` ``(N, 4)``,
``pixel_aspects`` ``(N,)``, ``chunks`` ``(N,)`` (-1: not chunked) and
``alignment_residuals`` ``(N,)`` (NaN: none).
Flags: ``is_metric``, ``model_id``, ``model_preset``, ``model_revision`` ("" for none),
``precision``, ``processing_size``,
``output_resolution``, ``pose_conditioned``, ``reference_view`` (-1 for none), ``notes``, and
where the pipeline has them ``cameras_estimated``, ``intrinsics_source`` / ``focal_source``
("" for none), ``metric_scale`` (NaN for none); ``format_version``. 3D Gaussians are not stored
(their export is a separate format). No pickled objects: ``np.load(path)`` reads it as is.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from da3cog.export.cameras import PREDICTION_FLAGS
from da3cog.export.files import ManifestEntry, all_or_nothing, returning_paths
from da3cog.pipeline import Prediction, ViewPrediction

NPZ_NAME = "prediction.npz"
NPZ_FORMAT_VERSION = 1
_MAPS = (("depth", "depth", np.float32), ("confidence", "confidence", np.float32))
_MAPS += (("image", "images", np.uint8), ("sky", "sky", np.bool_))


@dataclass(frozen=True)
class ViewStack:
    """``(N, *shape)`` array of one map of every view, written view by view: stacking them
    in memory first would copy every view's map (a chunked run's outputs, spilled to disk,
    would come back whole).

    Attributes:
        maps: each view's map, all of one shape.
        dtype: the stored dtype.
    """

    maps: Sequence[Any]
    dtype: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.maps), *np.shape(self.maps[0]))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.stack([np.asarray(m, dtype=dtype or self.dtype) for m in self.maps])


def _camera_stack(views: tuple[ViewPrediction, ...], key: str, shape: tuple[int, int]):
    present = np.array([getattr(v, key) is not None for v in views])
    stacked = np.stack(
        [
            np.full(shape, np.nan, np.float32)
            if getattr(v, key) is None
            else np.asarray(getattr(v, key), np.float32)
            for v in views
        ]
    )
    return stacked, present


def prediction_arrays(prediction: Prediction) -> dict[str, np.ndarray | ViewStack]:
    """The bundle's arrays (see the module docstring): copies, but per-pixel maps of views of
    one size as :class:`ViewStack` (``np.asarray`` stacks one)."""
    views = prediction.views
    extrinsics, has_extrinsics = _camera_stack(views, "extrinsics", (4, 4))
    intrinsics, has_intrinsics = _camera_stack(views, "intrinsics", (3, 3))
    arrays: dict[str, np.ndarray | ViewStack] = {
        "format_version": np.array(NPZ_FORMAT_VERSION),
        "extrinsics": extrinsics,
        "intrinsics": intrinsics,
        "has_extrinsics": has_extrinsics,
        "has_intrinsics": has_intrinsics,
        "names": np.array([v.name for v in views], dtype=str),
        "input_sizes": np.array([v.input_size for v in views], dtype=np.int64),
        "crop_boxes": np.array([v.crop_box for v in views], dtype=np.float64),
        "pixel_aspects": np.array([v.pixel_aspect for v in views], dtype=np.float64),
        "chunks": np.array([-1 if v.chunk is None else v.chunk for v in views], dtype=np.int64),
        "alignment_residuals": np.array(
            [np.nan if v.alignment_residual is None else v.alignment_residual for v in views],
            dtype=np.float64,
        ),
        "is_metric": np.array(prediction.is_metric),
        "model_id": np.array(prediction.model_id),
        "model_preset": np.array(prediction.model_preset),
        "model_revision": np.array(prediction.model_revision or ""),
        "precision": np.array(prediction.precision),
        "processing_size": np.array(prediction.processing_size, dtype=np.int64),
        "output_resolution": np.array(prediction.output_resolution),
        "pose_conditioned": np.array(prediction.pose_conditioned),
        "reference_view": np.array(
            -1 if prediction.reference_view is None else prediction.reference_view
        ),
        "notes": np.array(list(prediction.notes), dtype=str).reshape(-1),
    }
    for flag in PREDICTION_FLAGS:
        if hasattr(prediction, flag):
            value = getattr(prediction, flag)
            if flag == "metric_scale":
                arrays[flag] = np.array(np.nan if value is None else float(value))
            elif flag == "cameras_estimated":
                arrays[flag] = np.array(bool(value))
            else:
                arrays[flag] = np.array("" if value is None else str(value))
    stacked = len({v.depth.shape for v in views}) == 1
    arrays["layout"] = np.array("stacked" if stacked else "per_view")
    for attribute, stacked_key, dtype in _MAPS:
        maps = [getattr(v, attribute, None) for v in views]
        present = all(m is not None for m in maps)
        if attribute in ("confidence", "sky"):
            arrays[f"has_{attribute}"] = np.array(present)
        if not present:
            continue
        if stacked:
            arrays[stacked_key] = ViewStack(maps, dtype)
        else:
            for index, array in enumerate(maps):
                arrays[f"{attribute}_{index:04d}"] = np.asarray(array, dtype=dtype)
    return arrays


def write_npz(handle: IO[bytes], arrays: dict[str, np.ndarray | ViewStack], compress: bool) -> None:
    """``np.savez`` (``np.savez_compressed`` when ``compress``) of ``arrays``, no pickles, a
    :class:`ViewStack` written one view at a time (``np.load`` reads it as one array)."""
    compression = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(handle, "w", compression=compression, allowZip64=True) as archive:
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                if not isinstance(value, ViewStack):
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
                    continue
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(value.dtype)),
                    "fortran_order": False,
                    "shape": value.shape,
                }
                np.lib.format.write_array_header_1_0(member, header)
                for view_map in value.maps:
                    member.write(np.ascontiguousarray(view_map, dtype=value.dtype).tobytes())


def _write_npz(
    folder: Path,
    name: str,
    arrays: dict[str, np.ndarray | ViewStack],
    compress: bool,
    role: str,
    **details: Any,
) -> list[ManifestEntry]:
    """Write ``arrays`` as ``folder / name`` (zip-deflated when ``compress``), no pickles."""

    def write(target: Path) -> None:
        with target.open("wb") as handle:
            write_npz(handle, arrays, compress)

    with all_or_nothing() as batch:
        batch.write(folder / name, write, role, **details)
    return batch.entries


def npz_files(
    prediction: Prediction, folder: Path, *, compress: bool = True
) -> list[ManifestEntry]:
    """Write ``prediction.npz`` (zip-deflated when ``compress``)."""
    arrays = prediction_arrays(prediction)
    return _write_npz(folder, NPZ_NAME, arrays, compress, "npz", layout=str(arrays["layout"]))


UPSTREAM_NPZ_NAME = "prediction_upstream.npz"


def upstream_layout_problem(prediction: Prediction) -> str | None:
    """Why ``prediction`` cannot be written in upstream's NPZ layout, or None."""
    sizes = {(view.height, view.width) for view in prediction.views}
    if len(sizes) > 1:
        return (
            "upstream's NPZ layout stacks the views into one (N, H, W) array and these views "
            "have different sizes: export at output_resolution='processing'"
        )
    return None


def upstream_arrays(prediction: Prediction) -> dict[str, np.ndarray | ViewStack]:
    """The arrays of upstream's ``export_to_npz`` (``depth_anything_3.utils.export.npz``),
    under its keys, so scripts written for upstream's files read ours: ``image`` ``(N, H, W,
    3)`` uint8, ``depth`` ``(N, H, W)`` float32, ``conf`` ``(N, H, W)`` float32 when the model
    predicts confidence, ``extrinsics`` ``(N, 3, 4)`` world-to-camera and ``intrinsics``
    ``(N, 3, 3)`` float32 when the views have them. Values are not rounded (upstream rounds
    depth to 6 and confidence to 2 decimals). ValueError when the views differ in size."""
    problem = upstream_layout_problem(prediction)
    if problem is not None:
        raise ValueError(problem)
    views = prediction.views
    arrays: dict[str, np.ndarray | ViewStack] = {
        "image": ViewStack([v.image for v in views], np.uint8),
        "depth": ViewStack([v.depth for v in views], np.float32),
    }
    if all(v.confidence is not None for v in views):
        arrays["conf"] = ViewStack([v.confidence for v in views], np.float32)
    if all(v.extrinsics is not None for v in views):
        arrays["extrinsics"] = np.stack(
            [np.asarray(v.extrinsics, dtype=np.float32)[:3, :] for v in views]
        )
    if all(v.intrinsics is not None for v in views):
        arrays["intrinsics"] = np.stack([np.asarray(v.intrinsics, dtype=np.float32) for v in views])
    return arrays


def npz_upstream_files(
    prediction: Prediction, folder: Path, *, compress: bool = True
) -> list[ManifestEntry]:
    """Write ``prediction_upstream.npz`` in upstream's layout (see :func:`upstream_arrays`)."""
    arrays = upstream_arrays(prediction)
    return _write_npz(
        folder,
        UPSTREAM_NPZ_NAME,
        arrays,
        compress,
        "npz_upstream",
        keys=sorted(arrays),
        layout="depth_anything_3 export_to_npz (image, depth, conf, extrinsics, intrinsics)",
    )


export_npz = returning_paths(npz_files, "export_npz")


def _frozen(array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def load_npz(path: Path) -> Prediction:
    """Read a bundle written by :func:`export_npz` back into a :class:`Prediction`."""
    with np.load(path, allow_pickle=False) as archive:
        bundle = {key: archive[key] for key in archive.files}
    version = int(bundle["format_version"])
    if version != NPZ_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported bundle format_version {version}")
    stacked = str(bundle["layout"]) == "stacked"

    def per_view(attribute: str, stacked_key: str, index: int) -> np.ndarray | None:
        if stacked:
            return _frozen(bundle[stacked_key][index]) if stacked_key in bundle else None
        key = f"{attribute}_{index:04d}"
        return _frozen(bundle[key]) if key in bundle else None

    view_fields = {f.name for f in dataclasses.fields(ViewPrediction)}
    views = []
    for index, name in enumerate(bundle["names"].tolist()):
        maps = {attribute: per_view(attribute, key, index) for attribute, key, _ in _MAPS}
        extra: dict[str, Any] = {}
        if "sky" in view_fields:
            extra["sky"] = maps["sky"]
        elif maps["sky"] is not None:
            raise ValueError(f"{path}: has sky masks, which this da3cog version cannot hold")
        views.append(
            ViewPrediction(
                name=str(name),
                depth=maps["depth"],
                confidence=maps["confidence"],
                image=maps["image"],
                extrinsics=_frozen(bundle["extrinsics"][index])
                if bundle["has_extrinsics"][index]
                else None,
                intrinsics=_frozen(bundle["intrinsics"][index])
                if bundle["has_intrinsics"][index]
                else None,
                input_size=(
                    int(bundle["input_sizes"][index][0]),
                    int(bundle["input_sizes"][index][1]),
                ),
                crop_box=tuple(float(value) for value in bundle["crop_boxes"][index]),
                # Files written before pixel aspects were recorded hold square pixels only.
                pixel_aspect=float(bundle["pixel_aspects"][index])
                if "pixel_aspects" in bundle
                else 1.0,
                chunk=int(bundle["chunks"][index])
                if "chunks" in bundle and bundle["chunks"][index] >= 0
                else None,
                alignment_residual=float(bundle["alignment_residuals"][index])
                if "alignment_residuals" in bundle
                and np.isfinite(bundle["alignment_residuals"][index])
                else None,
                **extra,
            )
        )
    prediction_fields = {f.name for f in dataclasses.fields(Prediction)}
    flags: dict[str, Any] = {}
    for flag in PREDICTION_FLAGS:
        if flag in bundle and flag in prediction_fields:
            value = bundle[flag].item()
            if flag == "metric_scale":
                value = None if np.isnan(value) else float(value)
            elif flag != "cameras_estimated":
                value = str(value) or None
            flags[flag] = value
    reference = int(bundle["reference_view"])
    return Prediction(
        views=tuple(views),
        is_metric=bool(bundle["is_metric"]),
        model_id=str(bundle["model_id"]),
        model_preset=str(bundle["model_preset"]),
        # Files written before these two were stored read as the defaults.
        model_revision=str(bundle.get("model_revision", "")) or None,
        precision=str(bundle.get("precision", "fp32")),
        processing_size=(int(bundle["processing_size"][0]), int(bundle["processing_size"][1])),
        output_resolution=str(bundle["output_resolution"]),
        pose_conditioned=bool(bundle["pose_conditioned"]),
        reference_view=None if reference < 0 else reference,
        notes=tuple(str(note) for note in bundle["notes"].tolist()),
        **flags,
    )
