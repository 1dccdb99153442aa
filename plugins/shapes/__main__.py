"""Sample grid of the shapes data: ``python -m netshrink.plugins.shapes --grid shapes.png``.

One row per class (named on the left), drawn from the test split's generator stream of seed 0,
so the picture shows exactly what ``shapes32`` / ``shapes64`` contain.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from netshrink.plugins.shapes.generator import CLASSES, generate


def grid(path: Path, size: int = 32, per_class: int = 12, scale: int = 3, gray: bool = False):
    """Write a PNG with ``per_class`` samples of every class, upscaled ``scale`` times."""
    from PIL import Image, ImageDraw

    x, y = generate(size, per_class * len(CLASSES) * 3, seed=0, split="test")
    pad, label_w = 2, 80
    cell = size * scale + pad
    sheet = Image.new("RGB", (label_w + per_class * cell, len(CLASSES) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(CLASSES):
        draw.text((4, row * cell + cell // 2 - 6), name, fill="black")
        for col, i in enumerate(torch.nonzero(y == row)[:per_class, 0].tolist()):
            image = Image.fromarray(x[i].permute(1, 2, 0).numpy())
            if gray:
                image = image.convert("L").convert("RGB")
            image = image.resize((size * scale, size * scale), Image.NEAREST)
            sheet.paste(image, (label_w + col * cell, row * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m netshrink.plugins.shapes", description=__doc__)
    parser.add_argument("--grid", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels (32)")
    parser.add_argument("--per-class", type=int, default=12, help="samples per class (12)")
    parser.add_argument("--scale", type=int, default=3, help="upscaling factor (3)")
    parser.add_argument("--gray", action="store_true", help="show the grayscale variant")
    args = parser.parse_args(argv)
    print(grid(args.grid, args.size, args.per_class, args.scale, args.gray))


if __name__ == "__main__":
    main()
