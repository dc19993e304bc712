"""Depth and confidence maps per view: float32 ``.npy``, 16-bit PNG with its scale, colour
visualisation and confidence PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from da3cog.export.colormap import apply_colormap
from da3cog.export.files import ManifestEntry, all_or_nothing, returning_paths, view_file_name
from da3cog.export.points import pooled_percentile, sky_mask
from da3cog.pipeline import Prediction, ViewPrediction

PNG16_MAX = 65535
DEPTH_PNG_ENCODING = "depth = value * depth_scale; value 0 marks an invalid pixel"
CONFIDENCE_PNG_ENCODING = (
    "value / 255 = (confidence - confidence_low) / (confidence_high - confidence_low), clipped "
    "to [0, 1] (a visualisation; the exact values are in confidence_*.npy)"
)
# PNG zlib level: 1 is several times faster than the default 6 and, on smooth depth maps, only a
# few percent larger.
PNG_COMPRESS_LEVEL = 1


def _unit(prediction: Prediction) -> str:
    return "metres" if prediction.is_metric else "relative (shared by all views)"


# --------------------------------------------------------------------------------------------
# float32 .npy
# --------------------------------------------------------------------------------------------


def depth_npy_files(prediction: Prediction, folder: Path) -> list[ManifestEntry]:
    """Write ``depth_0000_<name>.npy`` and ``confidence_0000_<name>.npy`` (when the model
    predicts confidence) per view."""
    with all_or_nothing(parallel=True) as batch:
        for index, view in enumerate(prediction.views):
            for kind, array in (("depth", view.depth), ("confidence", view.confidence)):
                if array is None:  # models without confidence
                    continue

                def save(target: Path, array: np.ndarray = array) -> None:
                    with target.open("wb") as handle:
                        np.save(handle, np.asarray(array, dtype=np.float32))

                batch.write(
                    folder / view_file_name(kind, index, view.name, ".npy"),
                    save,
                    f"{kind}_npy",
                    index,
                )
    return batch.entries


export_depth_npy = returning_paths(depth_npy_files, "export_depth_npy")


# --------------------------------------------------------------------------------------------
# 16-bit PNG
# --------------------------------------------------------------------------------------------


def _valid(depth: np.ndarray) -> np.ndarray:
    return np.isfinite(depth) & (depth > 0)


def depth_png_scale(depth: np.ndarray) -> float:
    """The scale of a 16-bit depth PNG: the largest valid depth maps to 65535, so
    ``depth = value * scale`` within ``scale / 2``. 1.0 when no pixel is valid."""
    valid = depth[_valid(depth)]
    if not valid.size:
        return 1.0
    return float(np.float64(valid.max()) / PNG16_MAX)


def encode_depth_png16(depth: np.ndarray, scale: float) -> np.ndarray:
    """``(H, W)`` uint16: ``round(depth / scale)``, at least 1 for valid depth, 0 for invalid."""
    valid = _valid(depth)
    quantised = np.rint(np.where(valid, depth, 0.0).astype(np.float64) / scale)
    quantised = np.clip(quantised, 1, PNG16_MAX)
    return np.where(valid, quantised, 0).astype(np.uint16)


def depth_png16_files(prediction: Prediction, folder: Path) -> list[ManifestEntry]:
    """Write ``depth_0000_<name>.png`` per view: 16-bit grayscale, ``depth = value * scale`` with
    the scale in the PNG's ``depth_scale`` text chunk (and in the manifest); 0 = invalid."""
    from PIL import Image, PngImagePlugin

    unit = _unit(prediction)
    with all_or_nothing(parallel=True) as batch:
        for index, view in enumerate(prediction.views):
            scale = depth_png_scale(view.depth)
            info = PngImagePlugin.PngInfo()
            info.add_text("depth_scale", repr(scale))
            info.add_text("depth_encoding", DEPTH_PNG_ENCODING)
            info.add_text("depth_unit", unit)
            info.add_text("view_name", view.name)

            def save(target: Path, depth=view.depth, scale=scale, info=info) -> None:
                Image.fromarray(encode_depth_png16(depth, scale)).save(
                    target, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL
                )

            extra = {}
            if sky_mask(view) is not None:
                extra["sky"] = "sky pixels hold the model's far placeholder depth (mask: npz)"
            batch.write(
                folder / view_file_name("depth", index, view.name, ".png"),
                save,
                "depth_png16",
                index,
                scale=scale,
                encoding=DEPTH_PNG_ENCODING,
                unit=unit,
                **extra,
            )
    return batch.entries


export_depth_png16 = returning_paths(depth_png16_files, "export_depth_png16")


def read_depth_png16(path: Path) -> tuple[np.ndarray, float]:
    """Depth (float32, NaN where invalid) and scale of a PNG written by
    :func:`export_depth_png16`."""
    from PIL import Image

    with Image.open(path, formats=["PNG"]) as image:
        scale = float(image.text["depth_scale"])
        values = np.asarray(image, dtype=np.float64)
    depth = np.where(values > 0, values * scale, np.nan)
    return depth.astype(np.float32), scale


# --------------------------------------------------------------------------------------------
# Visualisations
# --------------------------------------------------------------------------------------------


def colorize_depth(
    depth: np.ndarray,
    colormap: str = "turbo",
    percentiles: tuple[float, float] = (2.0, 98.0),
    sky: np.ndarray | None = None,
) -> np.ndarray:
    """``(H, W, 3)`` uint8: inverse depth normalised to its ``percentiles`` range (near = warm
    end of the colormap), invalid pixels black. The range ignores ``sky`` pixels (their far
    placeholder depth), which get the far end of the colormap."""
    valid = _valid(depth)
    if not valid.any():
        return np.zeros((*depth.shape, 3), dtype=np.uint8)
    inverse = np.divide(
        np.float32(1.0), depth, out=np.zeros(depth.shape, np.float32), where=valid, dtype=np.float32
    )
    ranged = valid if sky is None else valid & ~sky
    if not ranged.any():
        ranged = valid
    low, high = np.percentile(inverse[ranged] if not ranged.all() else inverse, percentiles)
    span = max(float(high - low), 1e-12 * max(abs(float(high)), 1.0))
    inverse -= np.float32(low)
    inverse *= np.float32(1.0 / span)
    colours = apply_colormap(inverse, colormap)
    if not valid.all():
        colours[~valid] = 0
    return colours


VIS_FORMATS: tuple[str, ...] = ("png", "jpg")
JPEG_MAX_SIDE = 65_500


def depth_vis_files(
    prediction: Prediction,
    folder: Path,
    *,
    colormap: str = "turbo",
    side_by_side: bool = True,
    vis_format: str = "png",
) -> list[ManifestEntry]:
    """Write ``depth_vis_0000_<name>.png`` per view: inverse depth through ``colormap``
    (2nd-98th percentile range), to the right of the view's image when ``side_by_side``.
    ``vis_format="jpg"`` writes JPEG (quality 95) instead: about 10x faster to encode and 4x
    smaller on photos, not lossless."""
    from PIL import Image

    apply_colormap(np.zeros(1), colormap)  # an unknown colormap fails before any file
    if vis_format not in VIS_FORMATS:
        raise ValueError(f"vis_format must be one of {', '.join(VIS_FORMATS)}, got {vis_format!r}")
    for view in prediction.views if vis_format == "jpg" else ():
        width = view.width * (2 if side_by_side else 1)
        if max(width, view.height) > JPEG_MAX_SIDE:
            raise ValueError(
                f"vis_format='jpg': view {view.name}'s picture would be {width}x{view.height}, "
                f"and a JPEG is at most {JPEG_MAX_SIDE} pixels a side: use vis_format='png'"
                + (" or side_by_side=False" if side_by_side else "")
            )
    options = (
        {"format": "PNG", "compress_level": PNG_COMPRESS_LEVEL}
        if vis_format == "png"
        else {"format": "JPEG", "quality": 95}
    )
    with all_or_nothing(parallel=True) as batch:
        for index, view in enumerate(prediction.views):

            def save(target: Path, view: ViewPrediction = view) -> None:
                picture = colorize_depth(view.depth, colormap, sky=sky_mask(view))
                if side_by_side:
                    picture = np.concatenate([np.asarray(view.image, dtype=np.uint8), picture], 1)
                Image.fromarray(picture).save(target, **options)

            batch.write(
                folder / view_file_name("depth_vis", index, view.name, f".{vis_format}"),
                save,
                "depth_vis",
                index,
                colormap=colormap,
                side_by_side=side_by_side,
                encoding="inverse depth, 2nd-98th percentile range, near = warm colours",
            )
    return batch.entries


export_depth_vis = returning_paths(depth_vis_files, "export_depth_vis")


def confidence_range(prediction: Prediction) -> tuple[float, float]:
    """2nd and 98th percentiles of the finite confidence of all views (shared, so the PNGs of
    different views compare)."""
    maps = [view.confidence for view in prediction.views if view.confidence is not None]
    if not maps:
        raise ValueError("this prediction has no confidence maps (the model predicts none)")
    found = pooled_percentile(lambda: (np.asarray(m) for m in maps), (2.0, 98.0))
    if found is None:
        return 0.0, 1.0
    low, high = found
    if high <= low:
        high = low + max(abs(float(low)) * 1e-6, 1e-6)
    return float(low), float(high)


def confidence_png_files(prediction: Prediction, folder: Path) -> list[ManifestEntry]:
    """Write ``confidence_0000_<name>.png`` per view: 8-bit grayscale, brighter = more
    confident, over the range of :func:`confidence_range` (recorded in the PNG and manifest)."""
    from PIL import Image, PngImagePlugin

    low, high = confidence_range(prediction)
    info = PngImagePlugin.PngInfo()
    info.add_text("confidence_low", repr(low))
    info.add_text("confidence_high", repr(high))
    info.add_text("confidence_encoding", CONFIDENCE_PNG_ENCODING)
    with all_or_nothing(parallel=True) as batch:
        for index, view in enumerate(prediction.views):
            if view.confidence is None:
                continue

            def save(target: Path, confidence: np.ndarray = view.confidence) -> None:
                scaled = (np.asarray(confidence, dtype=np.float32) - low) / (high - low)
                scaled = np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0)
                grey = np.rint(scaled * 255).astype(np.uint8)
                Image.fromarray(grey).save(
                    target, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL
                )

            batch.write(
                folder / view_file_name("confidence", index, view.name, ".png"),
                save,
                "confidence_png",
                index,
                low=low,
                high=high,
                encoding=CONFIDENCE_PNG_ENCODING,
            )
    return batch.entries


export_confidence_png = returning_paths(confidence_png_files, "export_confidence_png")
