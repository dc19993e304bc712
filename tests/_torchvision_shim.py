"""A stand-in for the three ``torchvision.transforms`` classes the DA3 reference preprocessing uses.

The reference ``depth_anything_3.utils.io.input_processor`` imports ``torchvision.transforms``
for ``ToTensor``, ``Normalize`` and ``CenterCrop`` only. torchvision wheels from PyPI are built
against one exact torch release and fail to import beside the CPU torch wheel used here, so the
parity tests install this shim into ``sys.modules`` (inside the test process only) before
importing the reference.

The classes are written from torchvision's documented definitions:

* ``ToTensor``: a PIL image or ``(H, W, C)`` ``uint8`` array becomes a ``(C, H, W)`` tensor;
  8-bit data is converted to the default float dtype and divided by 255, other data is returned
  unscaled.
* ``Normalize(mean, std)``: ``(tensor - mean[:, None, None]) / std[:, None, None]`` per channel,
  with mean and std converted to the tensor's dtype, on a copy of the input.
* ``CenterCrop(size)``: crops ``(..., H, W)`` tensors to ``size`` (an int for a square or
  ``(h, w)``) starting at ``top = int(round((H - h) / 2.0))``,
  ``left = int(round((W - w) / 2.0))``; sides smaller than the crop are first zero-padded,
  ``floor(pad / 2)`` before and ``ceil(pad / 2)`` after.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# PIL modes whose pixels are not 8-bit and therefore keep their values (no /255) in ToTensor.
_NON_BYTE_MODES: dict[str, type[np.generic]] = {
    "I": np.int32,
    "I;16": np.int16,
    "I;16B": np.int16,
    "I;16L": np.int16,
    "F": np.float32,
}


class ToTensor:
    """PIL image / HWC ndarray -> CHW tensor, 8-bit data scaled to [0, 1]."""

    def __call__(self, picture: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(picture, np.ndarray):
            array = picture[:, :, None] if picture.ndim == 2 else picture
            tensor = torch.from_numpy(array.transpose((2, 0, 1))).contiguous()
        elif isinstance(picture, Image.Image):
            dtype = _NON_BYTE_MODES.get(picture.mode, np.uint8)
            array = np.array(picture, dtype=dtype, copy=True)
            if picture.mode == "1":
                array = array * 255
            width, height = picture.size
            channels = len(picture.getbands())
            tensor = torch.from_numpy(array).view(height, width, channels)
            tensor = tensor.permute((2, 0, 1)).contiguous()
        else:
            raise TypeError(f"picture should be a PIL Image or ndarray, got {type(picture)}")
        if tensor.dtype == torch.uint8:
            return tensor.to(dtype=torch.get_default_dtype()).div(255)
        return tensor


class Normalize:
    """Per-channel ``(x - mean) / std`` on a copy of a ``(..., C, H, W)`` float tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        result = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=result.dtype, device=result.device)
        std = torch.as_tensor(self.std, dtype=result.dtype, device=result.device)
        if bool((std == 0).any()):
            raise ValueError("std evaluated to zero, leading to division by zero.")
        if mean.ndim == 1:
            mean = mean.view(-1, 1, 1)
        if std.ndim == 1:
            std = std.view(-1, 1, 1)
        return result.sub_(mean).div_(std)


class CenterCrop:
    """Centre crop of a ``(..., H, W)`` tensor to ``size``; tensors only (all DA3 needs)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        if isinstance(size, int):
            self.size = (size, size)
        elif len(size) == 1:
            self.size = (int(size[0]), int(size[0]))
        else:
            self.size = (int(size[0]), int(size[1]))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"this CenterCrop stand-in takes tensors only, got {type(image)}")
        crop_height, crop_width = self.size
        height, width = image.shape[-2:]
        if crop_height > height or crop_width > width:
            pad_height = max(crop_height - height, 0)
            pad_width = max(crop_width - width, 0)
            image = torch.nn.functional.pad(
                image,
                (pad_width // 2, (pad_width + 1) // 2, pad_height // 2, (pad_height + 1) // 2),
            )
            height, width = image.shape[-2:]
        top = round((height - crop_height) / 2.0)
        left = round((width - crop_width) / 2.0)
        return image[..., top : top + crop_height, left : left + crop_width]


def install_torchvision_shim() -> None:
    """Make ``import torchvision.transforms`` work, preferring a real torchvision if usable."""
    try:
        import torchvision.transforms  # noqa: F401
    except Exception:
        for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    else:
        return

    transforms = types.ModuleType("torchvision.transforms")
    transforms.__doc__ = "Test-only stand-in, see tests/_torchvision_shim.py."
    transforms.ToTensor = ToTensor
    transforms.Normalize = Normalize
    transforms.CenterCrop = CenterCrop
    package = types.ModuleType("torchvision")
    package.__doc__ = transforms.__doc__
    package.__path__ = []
    package.transforms = transforms
    sys.modules["torchvision"] = package
    sys.modules["torchvision.transforms"] = transforms
