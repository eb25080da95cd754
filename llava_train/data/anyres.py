"""AnyRes tiling (LLaVA-NeXT): a large image as a grid of tower-sized tiles plus a global thumbnail.

Of the allowed grids, the one whose canvas shows the most of the image's own pixels wins
(upscaling adds none), and among equals the one that wastes the least canvas. The image is
resized to fit that canvas keeping its aspect ratio, padded with the mean colour, and cut
into tiles; the thumbnail is the whole image as a normal (pad-to-square) image. Every tile
goes through the tower and connector as an image of its own, so a sample with one
`<image>` carries rows x cols + 1 images, thumbnail first. LLaVA-NeXT additionally merges
the tile features into one unpadded grid with newline tokens; here the tiles stay separate
images, which any connector handles unchanged.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from llava_train.data.images import ImageProcessor

# LLaVA-NeXT's grid pinpoints for a 336-px tower (336x672, 672x336, 672x672, 1008x336, 336x1008), as [rows, cols].
DEFAULT_GRIDS = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))


def select_grid(width: int, height: int, grids, tile: int) -> tuple[int, int]:
    """The (rows, cols) grid for an image of width x height."""
    best, best_score = None, None
    for rows, cols in grids:
        canvas_w, canvas_h = cols * tile, rows * tile
        scale = min(canvas_w / width, canvas_h / height)
        shown = min(int(width * scale) * int(height * scale), width * height)
        score = (shown, -(canvas_w * canvas_h - shown))  # most detail kept, then least canvas wasted
        if best_score is None or score > best_score:  # ties keep the earlier grid
            best, best_score = (rows, cols), score
    return best


class AnyResTiler:
    def __init__(self, processor: ImageProcessor, grids=DEFAULT_GRIDS):
        grids = [tuple(g) for g in grids]
        if not grids or any(len(g) != 2 or min(g) < 1 for g in grids):
            raise ValueError(f"data.anyres_grids must be a non-empty list of [rows, cols] (positive ints), got {grids}")
        self.processor = processor
        self.grids = grids
        self.tile = processor.size

    def num_images(self, size: tuple[int, int]) -> int:
        """Images (tiles + thumbnail) an image of PIL size (width, height) becomes."""
        rows, cols = select_grid(*size, self.grids, self.tile)
        return rows * cols + 1

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        image = image.convert("RGB")
        rows, cols = select_grid(*image.size, self.grids, self.tile)
        canvas = self._fit(image, cols * self.tile, rows * self.tile)
        t = self.tile
        tiles = [canvas.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
        return [self.processor(image)] + [self.processor(tile) for tile in tiles]

    def _fit(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """Resize to fit width x height keeping the aspect ratio, centred on a mean-colour canvas."""
        scale = min(width / image.width, height / image.height)
        size = (min(width, math.ceil(image.width * scale)), min(height, math.ceil(image.height * scale)))
        resized = image.resize(size, resample=Image.Resampling.BICUBIC) if size != image.size else image
        fill = tuple(int(m * 255) for m in self.processor.mean)
        canvas = Image.new("RGB", (width, height), fill)
        canvas.paste(resized, ((width - size[0]) // 2, (height - size[1]) // 2))
        return canvas
