"""Input: decoding user images, preparing the network's input batch, reading camera files."""

from da3cog.io.cameras import CameraFileError, UserCameras, read_camera_file
from da3cog.io.exif import ExifFocal, exif_focal
from da3cog.io.images import ImageSource, image_name, load_image, source_size
from da3cog.io.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_PROCESS_RES,
    MIN_PROCESS_RES,
    MIXED_SHAPES,
    PATCH_SIZE,
    PROCESS_METHODS,
    PreparedBatch,
    ViewGeometry,
    prepare_images,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_PROCESS_RES",
    "MIN_PROCESS_RES",
    "MIXED_SHAPES",
    "PATCH_SIZE",
    "PROCESS_METHODS",
    "CameraFileError",
    "ExifFocal",
    "ImageSource",
    "PreparedBatch",
    "UserCameras",
    "ViewGeometry",
    "exif_focal",
    "image_name",
    "load_image",
    "prepare_images",
    "read_camera_file",
    "source_size",
]
