"""Reading objects off an image of the shapes world, rendered or generated.

The background is the per-channel median of the border. Each pixel is explained as a mix of the background
and one palette colour (the mix that leaves the smallest residual); it belongs to that colour when it is at
least half the colour, the residual is small, and clearly smaller than with any other colour. So anti-aliased
and blurred edges keep their colour, while pixels far from every mix (noise, colours off the palette) are left
out. Connected groups (8-neighbours) of one colour are objects, unless tiny. Shape, size and centre are
measured on soft coverage (each pixel's share of the colour, edges included), which anti-aliasing and blur
barely change: the fill of the bounding box is about 1 for a square and pi/4 for a circle, and a triangle
(apex up) has its centre of mass a sixth of its height below the middle of its rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmalign.world.scenes import BACKGROUNDS, COLOURS

__all__ = ["Detection", "DetectedObject", "detect"]

_NAMES = list(COLOURS)
_PALETTE = torch.tensor([COLOURS[c] for c in _NAMES], dtype=torch.float32) / 255.0
_BACKGROUND_NAMES = list(BACKGROUNDS)
_BACKGROUND_PALETTE = torch.tensor([BACKGROUNDS[c] for c in _BACKGROUND_NAMES], dtype=torch.float32) / 255.0
MARGIN = 0.6  # a pixel's nearest colour must be this much closer than the second nearest
MAX_RESIDUAL = 0.2  # and at most this far from it (RGB in [0, 1], Euclidean)
MIN_OFFSET = 0.1  # pixels closer than this to the background are background (too faint to be half a colour)
MIN_AREA = 0.01  # objects smaller than this fraction of the canvas are noise
MAX_BACKGROUND_DISTANCE = 0.25  # from the nearest background colour, else the background is unnamed
TRIANGLE_SKEW = 0.06  # a triangle's centre of mass lies 1/6 of its height below the middle; 0 for the others
EDGE_CUT = 0.15  # coverage below this counts as none, above 1 - EDGE_CUT as full
SQUARE_FILL = 0.875  # a square fills its bounding box (1), a circle does not (pi/4)
_CHUNK = 256
#: Fill of the bounding box per shape, to read an object's size from its area.
_FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}


@dataclass(frozen=True)
class DetectedObject:
    """An object found in an image; positions and sizes are fractions of the canvas.

    Attributes:
        colour, shape: names from ``COLOURS`` and ``SHAPES``.
        x, y: centre of mass (y grows downwards).
        scale: side of the bounding box of the detected shape with the detected area.
        area: covered fraction of the canvas.
        fill: area over the bounding box (square 1, circle pi/4, triangle 1/2).
        skew: how far the centre of mass lies below the middle of the rows, in heights (triangle 1/6).
    """

    colour: str
    shape: str
    x: float
    y: float
    scale: float
    area: float
    fill: float
    skew: float


@dataclass(frozen=True)
class Detection:
    """What one image holds: its background and its objects, largest first."""

    background: str | None
    background_rgb: tuple[float, float, float]
    objects: list[DetectedObject]


def _shape(fill: float, skew: float) -> str:
    return "triangle" if skew >= TRIANGLE_SKEW else "square" if fill >= SQUARE_FILL else "circle"


def _background(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` per-channel median of the border pixels."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    return border.median(dim=-1).values


def _neighbours(x: torch.Tensor, fill: float) -> list[torch.Tensor]:
    """The 8 neighbours of each pixel of ``(B, H, W)`` (``fill`` outside the image)."""
    h, w = x.shape[-2:]
    padded = F.pad(x[:, None], (1, 1, 1, 1), value=fill)[:, 0]
    return [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3) if (i, j) != (1, 1)]


def _components(labels: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` ids of 8-connected same-label regions (0 where ``labels`` is -1), unique over the batch.

    Works on the labelled pixels only: each takes the largest index among itself and its same-label
    neighbours, then the index that one points at (pointer jumping), until nothing changes.
    """
    pixels = torch.nonzero(labels.reshape(-1) >= 0).squeeze(1)
    count = len(pixels)
    index = torch.full((labels.numel(),), -1, dtype=torch.long)
    index[pixels] = torch.arange(count)
    index = index.view(labels.shape)
    own = torch.arange(count)
    links = [own]
    for label, neighbour in zip(_neighbours(labels, -2), _neighbours(index, -1)):
        linked = torch.where(label == labels, neighbour, -1).reshape(-1)[pixels]
        links.append(torch.where(linked >= 0, linked, own))
    links = torch.stack(links, 1)  # (N, 9)
    root = own
    while True:
        new = root[links].amax(1)
        new = new[new]
        if torch.equal(new, root):
            break
        root = new
    ids = torch.zeros(labels.numel(), dtype=torch.long)
    ids[pixels] = pixels[root] + 1
    return ids.view(labels.shape)


def _classify(offset: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` palette index of each pixel, -1 where it is background, a mix of colours or off-palette.

    ``offset``: ``(B*H*W, 3)`` pixels minus their image's background; ``direction``: ``(B, C, 3)`` palette
    colours minus the background. Only pixels away from the background are examined.
    """
    candidates = torch.nonzero(offset.square().sum(1) > MIN_OFFSET**2).squeeze(1)
    o = offset[candidates]
    d = direction[candidates // (offset.shape[0] // direction.shape[0])]  # (N, C, 3)
    proj, length2 = (d * o[:, None]).sum(-1), d.square().sum(-1)
    alpha = (proj / length2).clamp(0, 1)
    residual2 = o.square().sum(1, keepdim=True) - 2 * alpha * proj + alpha.square() * length2
    r1, nearest = residual2.min(1)
    r2 = residual2.scatter(1, nearest[:, None], float("inf")).min(1).values
    share = alpha.gather(1, nearest[:, None])[:, 0]
    owned = (share >= 0.5) & (r1 <= MARGIN**2 * r2) & (r1 <= MAX_RESIDUAL**2)
    labels = torch.full((offset.shape[0],), -1, dtype=torch.long)
    labels[candidates[owned]] = nearest[owned]
    return labels


def _detect_chunk(images: torch.Tensor) -> list[Detection]:
    b, _, h, w = images.shape
    bg = _background(images)
    offset = (images - bg[..., None, None]).permute(0, 2, 3, 1).reshape(-1, 3)
    direction = _PALETTE[None] - bg[:, None]  # (B, C, 3)
    labels = _classify(offset, direction).view(b, h, w)
    core = labels >= 0
    ids = _components(labels)
    uniq, counts = torch.unique(ids[core], return_counts=True)
    uniq = uniq[counts >= MIN_AREA * h * w]
    n = len(uniq)
    comp_of = torch.full((b * h * w + 1,), -1, dtype=torch.long)
    comp_of[uniq] = torch.arange(n)
    image_of, label_of = (uniq - 1) // (h * w), labels.view(-1)[uniq - 1]

    # each object's pixels plus a ring around them (its anti-aliased or blurred edge)
    grown = ids.clone()
    for _ in range(max(1, h // 32)):
        for neighbour in _neighbours(grown, 0):
            grown = torch.maximum(grown, neighbour)
    comp = comp_of[torch.where(core, ids, grown).view(-1)]
    pix = torch.nonzero(comp >= 0).squeeze(1)
    comp = comp[pix]
    d = direction[image_of[comp], label_of[comp]]  # (N, 3)
    a = ((offset[pix] * d).sum(1) / d.square().sum(1)).clamp(0, 1)  # the object colour's share of each pixel

    def total(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n).index_add_(0, comp, values.float())

    # full coverage reads as the mean share of the interior (or of the whole object when it has none)
    interior = core.clone()
    for neighbour in _neighbours(ids, 0):
        interior &= neighbour == ids
    inner, owned = interior.view(-1)[pix], core.view(-1)[pix]
    full = torch.where(
        total(inner) > 0, total(a * inner) / total(inner).clamp(min=1), total(a * owned) / total(owned)
    )
    # coverage, the faint tail cut symmetrically so that noise around an object does not widen it
    weight = ((a / full.clamp(min=0.2)[comp] - EDGE_CUT) / (1 - 2 * EDGE_CUT)).clamp(0, 1)
    ys, xs = (pix % (h * w)) // w, pix % w
    area = total(weight)
    cx, cy = total(weight * (xs + 0.5)) / area / w, total(weight * (ys + 0.5)) / area / h
    cols = torch.zeros(n * w).scatter_reduce_(0, comp * w + xs, weight, "amax").view(n, w)
    rows = torch.zeros(n * h).scatter_reduce_(0, comp * h + ys, weight, "amax").view(n, h)
    width, height = cols.sum(1), rows.sum(1).clamp(min=1e-6)
    fill = area / (width * height).clamp(min=1e-6)
    skew = (cy * h - (rows * (torch.arange(h) + 0.5)).sum(1) / height) / height

    objects: list[list[DetectedObject]] = [[] for _ in range(b)]
    for i, values in enumerate(
        torch.stack([label_of.float(), cx, cy, area / (h * w), fill, skew], 1).tolist()
    ):
        label, x, y, share, fill_i, skew_i = values
        shape = _shape(fill_i, skew_i)
        objects[int(image_of[i])].append(
            DetectedObject(
                _NAMES[int(label)], shape, x, y, (share / _FILL[shape]) ** 0.5, share, fill_i, skew_i
            )
        )
    bg_distance, bg_index = torch.cdist(bg, _BACKGROUND_PALETTE).min(dim=1)
    return [
        Detection(
            _BACKGROUND_NAMES[int(bg_index[k])] if bg_distance[k] <= MAX_BACKGROUND_DISTANCE else None,
            tuple(bg[k].tolist()),
            sorted(objects[k], key=lambda o: -o.area),
        )
        for k in range(b)
    ]


def detect(images: torch.Tensor) -> list[Detection]:
    """The background and objects of each image of a ``(B, 3, H, W)`` batch in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a (B, 3, H, W) tensor, got {got}")
    images = images.detach().cpu().float()
    return [
        d for start in range(0, len(images), _CHUNK) for d in _detect_chunk(images[start : start + _CHUNK])
    ]
