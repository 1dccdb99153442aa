"""The procedural renderer behind the ``shapes`` datasets: vectorised, seeded, no per-pixel loops.

Every image is one labelled shape on a textured background, drawn as an anti-aliased implicit
function (an approximate signed distance in pixels, turned into coverage) over a whole batch at
once. What makes it hard: random pose (rotation, scale, aspect ratio, position), random colours
with a random luminance contrast (sometimes faint), textured fills and backgrounds, clutter
(small blobs and strokes behind and in front of the shape), an occluding bar, pixel noise, and
a share of camouflaged shapes that barely differ from their background (these keep every model
below 100%). The class is the outline alone: colour and texture carry no information about it.

Scene parameters are drawn independently of the image size, so ``size=64`` renders the same
scenes as ``size=32`` at twice the resolution. Each chunk of :data:`SCENE_CHUNK` images has its
own seed, derived from the dataset seed, the split and the chunk index, so the output does not
depend on how many threads render it.

Speed: coordinates are separable (per-image row and column vectors, summed into a full plane in
one pass), plane waves use ``sin(a + b) = sin a cos b + cos a sin b`` on those vectors, shapes
are rendered per class on contiguous slices, pixel noise comes from a bank of noise fields per
split (``torch.randn`` over every pixel would cost more than all the drawing), and chunks are
rendered in parallel threads.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: Bump when the rendering changes: cached datasets are keyed by it and rebuilt, and it is part
#: of the dataset's name (``shapes32@v2``), so reference models trained on older data are not
#: reused. tests/test_shapes.py pins :func:`fingerprint` per version.
GENERATOR_VERSION = 2

CLASSES: tuple[str, ...] = (
    "disc",
    "ring",
    "triangle",
    "square",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "crescent",
    "arrow",
)

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_NOISE_BANK = 1024  # noise fields per split, each image adds one of them, scaled
#: Images per random stream. Fixed (not tied to the image size) so that every size renders the
#: same scenes; small enough that a chunk's planes stay in the CPU caches.
SCENE_CHUNK = 128
_CLUTTER = 3
#: Difficulty settings, calibrated so small CNNs land between 85% and 95% (docs/datasets.md).
#: They are part of the cache key; bump GENERATOR_VERSION too when changing them.
KNOBS = {
    "clutter": 0.35,  # chance of each of the clutter items
    "clutter_front": 0.15,  # chance a clutter item is drawn over the shape
    "occluder": 0.2,  # chance of an occluding bar over the shape
    "scale": (0.55, 0.9),  # shape radius, in half image widths
    "aspect": 0.12,  # log aspect ratio range (+-)
    "background_texture": 0.2,  # max amplitude of the background texture
    "fill_texture": (0.4, 0.2),  # chance of a textured fill, its max amplitude
    "noise": 0.03,  # max pixel noise std
    "contrast": (0.25, 0.4),  # min luminance contrast, and the range above it
    "camouflage": 0.07,  # share of shapes that barely differ from their background
    "camouflage_delta": (0.005, 0.02),  # their colour difference per channel
    "camouflage_noise": (0.05, 0.07),  # and their pixel noise std
}


def fingerprint() -> str:
    """SHA-256 of the settings that shape the output (classes, knobs, chunking, bank size)."""
    settings = {
        "classes": CLASSES,
        "knobs": KNOBS,
        "scene_chunk": SCENE_CHUNK,
        "noise_bank": _NOISE_BANK,
        "clutter": _CLUTTER,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def chunk_seed(seed: int, split: str, chunk: int) -> int:
    """A 63-bit seed for one chunk of one split (independent streams via numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, SPLIT_IDS[split], chunk]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class _Draw:
    """Random draws for ``n`` images from one generator, shaped for broadcasting."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.rand(self.n, *shape, generator=self.gen) * (high - low) + low

    def chance(self, p: float, *shape: int) -> torch.Tensor:
        return torch.rand(self.n, *shape, generator=self.gen) < p


def _colours(draw: _Draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Background and foreground RGB colours whose luminances differ by a random contrast."""
    bg = draw.uniform(0, 1, 3)
    fg = draw.uniform(0, 1, 3)
    lum_bg = bg @ _LUMA
    # Mostly clear contrast, with a tail of faint shapes (hard on purpose).
    low, span = KNOBS["contrast"]
    contrast = low + span * draw.uniform(0, 1) ** 1.5
    sign = torch.where(draw.chance(0.5), -1.0, 1.0)
    target = lum_bg + sign * contrast
    outside = (target < 0) | (target > 1)
    target = torch.where(outside, lum_bg - sign * contrast, target).clamp(0, 1)
    fg = (fg + (target - fg @ _LUMA)[:, None]).clamp(0, 1)
    return bg, fg


class _Grid:
    """Pixel-centre coordinates in [-1, 1] as a row ``x`` (1, 1, S) and a column ``y`` (1, S, 1)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.half = size / 2
        c = (torch.arange(size, dtype=torch.float32) + 0.5) / self.half - 1
        self.x = c.view(1, 1, size)
        self.y = c.view(1, size, 1)

    def linear(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``a * x + b * y + c`` per image (each ``(n,)``): one full-size pass."""
        return (a[:, None, None] * self.x + c[:, None, None]) + b[:, None, None] * self.y

    def waves(self, draw: _Draw, k: int, fmin: float, fmax: float) -> torch.Tensor:
        """A sum of ``k`` random plane waves per image, scaled to [-1, 1], shape (n, S, S)."""
        angle = draw.uniform(0, 2 * math.pi, k, 1, 1)
        freq = draw.uniform(fmin, fmax, k, 1, 1)
        phase = draw.uniform(0, 2 * math.pi, k, 1, 1)
        ax = freq * torch.cos(angle) * self.x + phase  # (n, k, 1, S)
        ay = freq * torch.sin(angle) * self.y  # (n, k, S, 1)
        out = torch.sin(ax) * torch.cos(ay)  # (n, k, S, S)
        out += torch.cos(ax) * torch.sin(ay)
        return out.sum(1).div_(k)

    def coverage(self, dist: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Anti-aliased coverage of a shape from its signed distance (times ``scale``) in
        grid units: 1 inside, 0 outside, a one-pixel ramp at the edge. In place."""
        return dist.mul_(-self.half * scale).add_(0.5).clamp_(0, 1)


def _star_radius(phi: torch.Tensor, n: int, k: float | torch.Tensor) -> torch.Tensor:
    """Boundary radius at angle ``phi`` of the polygon whose ``2n`` vertices alternate between
    radius 1 and ``k`` (a regular ``n``-gon when ``k = cos(pi / n)``)."""
    sector = 2 * math.pi / n
    half = math.pi / n
    fold = torch.remainder(phi, sector).sub_(half).abs_()  # angle to the mid-edge/inner vertex
    # Polar line through (1, 0) and (k, half), measured from the inner vertex direction.
    return k * math.sin(half) / (torch.sin(half - fold) + k * torch.sin(fold))


def _distance(cls: int, u: torch.Tensor, v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (shape units, negative inside) of class ``cls``."""
    p = p[:, :, None, None]
    if cls == 7:  # cross: the union of two bars of half-width p2
        au, av = u.abs(), v.abs()
        return torch.minimum(
            torch.maximum(au - 1, av - p[:, 2]), torch.maximum(au - p[:, 2], av - 1)
        )
    if cls == 9:  # arrow: a triangular head and a shaft of half-width p5
        uu, vv = u + 0.1, v.abs()
        head = torch.maximum(0.15 - uu, (vv - 0.75 * (1.05 - uu) / 0.9) / 1.25)
        shaft = torch.maximum(vv - p[:, 5], torch.maximum(uu - 0.3, -1.0 - uu))
        return torch.minimum(head, shaft)
    rho = torch.sqrt(u * u + v * v)
    if cls == 0:  # disc
        return rho - 1
    if cls == 1:  # ring of half-width p0
        return (rho - (1 - p[:, 0])).abs_() - p[:, 0]
    if cls == 8:  # crescent: a disc minus a shifted disc (offset p3, radius p4)
        cut = torch.sqrt((u - p[:, 3]) ** 2 + v * v)
        return torch.maximum(rho - 1, p[:, 4] - cut)
    phi = torch.atan2(v, u)
    if cls == 6:  # five-pointed star, inner radius p1
        return (rho - _star_radius(phi, 5, p[:, 1])) * 0.6
    sides = cls + 1  # triangle .. hexagon
    apothem = math.cos(math.pi / sides)
    return (rho - _star_radius(phi, sides, apothem)) * apothem


def render(labels: torch.Tensor, size: int, seed: int, bank: torch.Tensor) -> torch.Tensor:
    """Render one image per label as ``uint8`` ``(n, 3, size, size)``; ``labels`` must be sorted
    (the shapes are drawn per class on contiguous slices). ``bank`` holds noise fields
    ``(m, 3, size, size)``; each image adds one, scaled."""
    n = len(labels)
    draw = _Draw(n, seed)
    grid = _Grid(size)

    # Background: a colour and a soft texture in a random tint.
    bg, fg = _colours(draw)
    amp = draw.uniform(0, KNOBS["background_texture"])
    tex_col = amp[:, None] * (torch.rand(n, 3, generator=draw.gen) - 0.5)
    img = bg[:, :, None, None] + tex_col[:, :, None, None] * grid.waves(draw, 2, 1.0, 9.0)[:, None]

    # Clutter: capsules (a blob is a capsule of length 0), some in front of the shape.
    c_on = draw.chance(KNOBS["clutter"], _CLUTTER)
    c_front = draw.chance(KNOBS["clutter_front"], _CLUTTER)
    c_xy = draw.uniform(-1, 1, _CLUTTER, 2)
    c_ang = draw.uniform(0, math.pi, _CLUTTER)
    c_len = torch.where(draw.chance(0.5, _CLUTTER), draw.uniform(0.15, 0.6, _CLUTTER), 0.0)
    c_width = torch.where(
        c_len > 0, draw.uniform(0.02, 0.07, _CLUTTER), draw.uniform(0.05, 0.17, _CLUTTER)
    )
    c_col = draw.uniform(0, 1, _CLUTTER, 3)

    def clutter(i: int) -> torch.Tensor:
        dx, dy = torch.cos(c_ang[:, i]) * c_len[:, i], torch.sin(c_ang[:, i]) * c_len[:, i]
        inv = 1 / (dx * dx + dy * dy + 1e-9)
        cx, cy = c_xy[:, i, 0], c_xy[:, i, 1]
        h = grid.linear(dx * inv, dy * inv, -(cx * dx + cy * dy) * inv).clamp_(-1, 1)
        ex = grid.linear(torch.ones(n), torch.zeros(n), -cx).sub_(h * dx[:, None, None])
        ey = grid.linear(torch.zeros(n), torch.ones(n), -cy).sub_(h * dy[:, None, None])
        dist = ex.square_().add_(ey.square_()).sqrt_().sub_(c_width[:, i, None, None])
        return grid.coverage(dist)

    alphas = [clutter(i).mul_(c_on[:, i, None, None]) for i in range(_CLUTTER)]
    for i, a in enumerate(alphas):
        img.lerp_(c_col[:, i, :, None, None], (a * ~c_front[:, i, None, None])[:, None])

    # The labelled shape: pose, per-class parameters, fill texture.
    scale = draw.uniform(*KNOBS["scale"])
    aspect = torch.exp(draw.uniform(-KNOBS["aspect"], KNOBS["aspect"]))
    theta = draw.uniform(0, 2 * math.pi)
    reach = 1.0 - 0.8 * scale
    cx, cy = draw.uniform(-1, 1) * reach, draw.uniform(-1, 1) * reach
    sx, sy = scale * aspect.sqrt(), scale / aspect.sqrt()
    cos, sin = torch.cos(theta), torch.sin(theta)
    u = grid.linear(cos / sx, sin / sx, -(cos * cx + sin * cy) / sx)
    v = grid.linear(-sin / sy, cos / sy, (sin * cx - cos * cy) / sy)
    params = torch.stack(
        [
            draw.uniform(0.16, 0.3),  # ring half-width
            draw.uniform(0.38, 0.55),  # star inner radius
            draw.uniform(0.24, 0.4),  # cross bar half-width
            draw.uniform(0.35, 0.6),  # crescent cut offset
            draw.uniform(0.75, 0.95),  # crescent cut radius
            draw.uniform(0.14, 0.26),  # arrow shaft half-width
        ],
        1,
    )
    dist = torch.empty_like(u)
    bounds = torch.searchsorted(labels, torch.arange(len(CLASSES) + 1))
    for cls in range(len(CLASSES)):
        lo, hi = int(bounds[cls]), int(bounds[cls + 1])
        if hi > lo:
            dist[lo:hi] = _distance(cls, u[lo:hi], v[lo:hi], params[lo:hi])
    shape_alpha = grid.coverage(dist, torch.minimum(sx, sy)[:, None, None])
    fill_chance, fill_max = KNOBS["fill_texture"]
    fill_amp = draw.uniform(0.0, fill_max) * draw.chance(fill_chance)
    fill = (
        fg[:, :, None, None]
        + fill_amp[:, None, None, None] * grid.waves(draw, 2, 2.0, 9.0)[:, None]
    )
    # Camouflaged shapes keep the background's texture and shift its colour a little: with
    # their stronger noise, many are unrecognisable. They set the ceiling below 100%.
    camo = draw.chance(KNOBS["camouflage"])
    low, high = KNOBS["camouflage_delta"]
    shift = draw.uniform(low, high, 3) * torch.where(draw.chance(0.5, 3), -1.0, 1.0)
    visible = shape_alpha * ~camo[:, None, None]
    img.lerp_(fill, visible[:, None])
    img.add_(shift[:, :, None, None] * (shape_alpha - visible)[:, None])
    for i, a in enumerate(alphas):
        img.lerp_(c_col[:, i, :, None, None], a.mul_(c_front[:, i, None, None])[:, None])

    # An occluding bar (a short capsule) over part of the shape, in some of the images.
    occ_on = draw.chance(KNOBS["occluder"])
    occ_ang = draw.uniform(0, 2 * math.pi)
    occ_off = draw.uniform(0.3, 1.0) * scale
    occ_len = draw.uniform(0.4, 0.9) * scale
    occ_w = draw.uniform(0.08, 0.2) * scale
    occ_col = draw.uniform(0, 1, 3)
    ca, sa = torch.cos(occ_ang), torch.sin(occ_ang)
    # Centre: ``occ_off`` from the shape's centre along the bar's normal.
    ox, oy = cx - sa * occ_off, cy + ca * occ_off
    along = grid.linear(ca, sa, -(ca * ox + sa * oy))
    along.clamp_(min=-occ_len[:, None, None]).clamp_(max=occ_len[:, None, None])
    ex = grid.linear(torch.ones(n), torch.zeros(n), -ox).sub_(along * ca[:, None, None])
    ey = grid.linear(torch.zeros(n), torch.ones(n), -oy).sub_(along * sa[:, None, None])
    occ = ex.square_().add_(ey.square_()).sqrt_().sub_(occ_w[:, None, None])
    img.lerp_(occ_col[:, :, None, None], grid.coverage(occ).mul_(occ_on[:, None, None])[:, None])

    # Pixel noise: one field of the bank per image, scaled.
    pick = torch.randint(0, len(bank), (n,), generator=draw.gen)
    sigma = torch.where(
        camo, draw.uniform(*KNOBS["camouflage_noise"]), draw.uniform(0.0, KNOBS["noise"])
    )
    img.add_(bank[pick].mul_(sigma[:, None, None, None]))
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def generate(size: int, n: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (uint8, ``(n, 3, size, size)``) with labels for one split, classes balanced.

    Chunks are rendered in parallel by Python threads (torch releases the GIL in its kernels),
    each op single-threaded: with many small ops, torch's own intra-op threads spend more time
    in fork/join barriers than computing, and stall badly when another process holds a core.
    """
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    noise_gen = torch.Generator().manual_seed(chunk_seed(seed, split, 1 << 30))
    bank = torch.randn(min(_NOISE_BANK, n), 3, size, size, generator=noise_gen)

    def chunk(index: int) -> None:
        start, stop = index * SCENE_CHUNK, min((index + 1) * SCENE_CHUNK, n)
        s = chunk_seed(seed, split, index)
        # Balanced: each class (almost) equally often in every chunk. Rendered sorted by class,
        # then shuffled with the chunk's own permutation.
        lab = torch.sort(torch.arange(start, stop) % len(CLASSES)).values
        order = torch.randperm(stop - start, generator=torch.Generator().manual_seed(s ^ 1))
        images[start:stop] = render(lab, size, s, bank)[order]
        labels[start:stop] = lab[order]

    workers = max(1, torch.get_num_threads())
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(chunk, range((n + SCENE_CHUNK - 1) // SCENE_CHUNK)))
    finally:
        torch.set_num_threads(workers)
    return images, labels
