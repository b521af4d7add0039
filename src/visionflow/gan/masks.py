"""Hole masks for image repair, drawn as batched tensor ops from a seeded generator.

A mask is a float tensor (N, 1, S, S): 1 where pixels are missing (the hole), 0 where they are known.
Training mixes three kinds, so the model meets both the evaluation's centre block and irregular damage:
- `center`: a square block in the middle (the standard benchmark hole),
- `rect`: one rectangle of random size and place,
- `stroke`: free-form brush strokes, polylines of random thick segments (as in Yu et al. 2019).
"""

from __future__ import annotations

import torch

MASK_KINDS = ("center", "rect", "stroke")


def center_masks(count: int, size: int, hole: int) -> torch.Tensor:
    """A hole x hole square in the middle of every image."""
    masks = torch.zeros(count, 1, size, size)
    top = (size - hole) // 2
    masks[:, :, top:top + hole, top:top + hole] = 1.0
    return masks


def box_masks(size: int, boxes: torch.Tensor) -> torch.Tensor:
    """Boxes (N, 4) as integer (x, y, width, height) in pixels -> masks; parts outside the image are dropped."""
    coords = torch.arange(size)
    x, y, w, h = (boxes[:, i].view(-1, 1) for i in range(4))
    inside_x = (coords >= x) & (coords < x + w)            # (N, S) columns inside each box
    inside_y = (coords >= y) & (coords < y + h)            # (N, S) rows inside each box
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]


def random_rectangle_masks(count: int, size: int, generator: torch.Generator,
                           min_side: float = 0.2, max_side: float = 0.6) -> torch.Tensor:
    """One rectangle per image, each side between min_side and max_side of the image side."""
    low, high = max(1, round(min_side * size)), max(1, round(max_side * size))
    sides = torch.randint(low, high + 1, (count, 2), generator=generator)
    corner = (torch.rand(count, 2, generator=generator) * (size - sides + 1)).long()
    return box_masks(size, torch.cat([corner, sides], dim=1))


def random_stroke_masks(count: int, size: int, generator: torch.Generator, strokes: int = 3,
                        vertices: int = 5) -> torch.Tensor:
    """Brush strokes: each a random walk of `vertices` points drawn with a random width."""
    start = torch.rand(count, strokes, 1, 2, generator=generator) * size
    angles = torch.rand(count, strokes, vertices - 1, generator=generator) * 2 * torch.pi
    lengths = (0.1 + 0.2 * torch.rand(count, strokes, vertices - 1, generator=generator)) * size
    steps = torch.stack([angles.cos(), angles.sin()], dim=-1) * lengths[..., None]
    points = torch.cat([start, start + steps.cumsum(dim=2)], dim=2)        # (N, K, V, 2)
    width = (0.04 + 0.06 * torch.rand(count, strokes, 1, 1, generator=generator)) * size
    a, b = points[:, :, :-1], points[:, :, 1:]                              # segment ends (N, K, V-1, 2)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1).view(1, 1, 1, -1, 2)  # (.., S*S, 2)
    # distance from every pixel centre to every segment: project onto the segment, clamp to its ends
    direction = (b - a)[..., None, :]
    t = ((grid - a[..., None, :]) * direction).sum(-1) / direction.pow(2).sum(-1).clamp(min=1e-6)
    nearest = a[..., None, :] + t.clamp(0, 1)[..., None] * direction
    distance = (grid - nearest).norm(dim=-1)                               # (N, K, V-1, S*S)
    covered = (distance <= width / 2).any(dim=2).any(dim=1)                # (N, S*S)
    return covered.float().view(count, 1, size, size)


def random_masks(count: int, size: int, generator: torch.Generator, center_hole: int | None = None) -> torch.Tensor:
    """A mix of the three kinds, chosen per image with equal odds (centre blocks of half the side by default)."""
    kind = torch.randint(0, len(MASK_KINDS), (count,), generator=generator)
    hole = center_hole or size // 2
    # draw every kind for every image so the random stream does not depend on which kinds were picked
    choices = torch.stack([center_masks(count, size, hole), random_rectangle_masks(count, size, generator),
                           random_stroke_masks(count, size, generator)])
    return choices[kind, torch.arange(count)]


def coverage(masks: torch.Tensor) -> torch.Tensor:
    """The fraction of each image that is hole."""
    return masks.flatten(1).mean(dim=1)
