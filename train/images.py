"""Image preprocessing for training: the exported processor's geometry, done once per image in a worker.

The transformers processor converts every image to float numpy arrays before padding, resizing and
normalising; here the geometry (pad to square with the mean colour, bicubic resize, centre crop) runs on
the decoded 8-bit image with PIL's C code, and only the final normalisation is a tensor op. The pixels
equal the exported processor's (a test checks), so training and inference see the same input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.errors import TrainError


@dataclass(frozen=True)
class ImageTransform:
    """Pad-to-square or resize + centre-crop to `size`, then (x / 255 - mean) / std, as (3, H, W) float32."""

    height: int
    width: int
    shortest_edge: int | None  # resize so the short side is this (then crop); None: resize to height x width
    crop: tuple[int, int] | None
    pad: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_processor(cls, processor: Any) -> "ImageTransform":
        """Read the geometry and normalisation of a transformers image processor (CLIP, SigLIP, Llava)."""
        size = dict(processor.size)
        crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) and processor.crop_size else None
        shortest = size.get("shortest_edge")
        height = size.get("height", shortest)
        width = size.get("width", shortest)
        return cls(
            height=int(height), width=int(width), shortest_edge=int(shortest) if shortest else None,
            crop=(int(crop["height"]), int(crop["width"])) if crop else None,
            pad=bool(getattr(processor, "do_pad", False)),
            mean=tuple(float(x) for x in processor.image_mean), std=tuple(float(x) for x in processor.image_std),
            resample=int(getattr(processor, "resample", Image.Resampling.BICUBIC) or Image.Resampling.BICUBIC),
        )

    def geometry(self, image: Image.Image) -> Image.Image:
        """Pad / resize / crop an RGB image (8-bit, PIL)."""
        if self.pad and image.width != image.height:
            side = max(image.width, image.height)
            # LLaVA's expand2square: the mean colour, truncated to 8 bits, with the image centred.
            square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in self.mean))
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        if self.shortest_edge is not None:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)
            target = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)
        else:
            target = (self.width, self.height)
        if image.size != target:
            image = image.resize(target, resample=self.resample)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = image.size
            top, left = (h - ch) // 2, (w - cw) // 2
            if top < 0 or left < 0:
                raise TrainError(f"image smaller than the crop ({w}x{h} < {cw}x{ch})", "check the image processor size")
            image = image.crop((left, top, left + cw, top + ch))
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Normalised (3, H, W) float32 tensor."""
        pixels = np.asarray(self.geometry(image), dtype=np.float32)
        # Same arithmetic order as the processor (rescale, then normalise) so float results match. numpy, not
        # torch: torch's intra-op threads make this 10x slower on a busy machine outside data-loader workers.
        pixels = (pixels * np.float32(1 / 255) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def load_image(path: Path, sample_id: str | None = None) -> Image.Image:
    """Decode an image file as RGB with a clear error naming the sample (paths come from resolve_image_path)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        owner = f"sample {sample_id}: " if sample_id is not None else ""
        raise TrainError(f"{owner}cannot read image {path} ({exc})", "replace or remove the broken file") from exc
