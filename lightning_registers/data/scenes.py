"""The generated demo dataset: scenes of coloured shapes with known classes, captions and boxes.

Every scene holds 1 to 3 objects on a plain (large uniform regions, where artifacts live) or
textured background. The main object, whose class is the label, is the largest; it is drawn
last so that it is never hidden. A scene depends only on (seed, split, index) and the
``SceneOptions``, so any subset can be regenerated exactly. The default options make the demo
dataset; others (smaller objects on plain backgrounds only, distractors nearly as large as the
main object) make scenes with more redundant patches and a label that needs the whole image.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Each class is a shape in its own colour, so that a class can be told by shape (what
# colour-jittered self-distillation learns) or by colour (what a small supervised ViT learns
# first); the colour's name is part of every caption.
CLASSES: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("circle", "red", (220, 40, 40)),
    ("square", "green", (40, 170, 60)),
    ("triangle", "blue", (40, 80, 220)),
    ("diamond", "yellow", (235, 210, 40)),
    ("star", "purple", (140, 60, 190)),
    ("cross", "cyan", (40, 200, 210)),
    ("ring", "orange", (245, 140, 30)),
    ("hexagon", "white", (245, 245, 245)),
    ("crescent", "pink", (250, 130, 190)),
    ("bar", "black", (20, 20, 20)),
)
CLASS_NAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for shape, colour, _ in CLASSES)
BACKGROUNDS = ("plain", "plain", "plain", "gradient", "stripes", "checker", "noise")
SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_003}


@dataclass(frozen=True)
class SceneOptions:
    """How scenes are drawn.

    Args:
        backgrounds: background kinds drawn from, uniformly (repeat a kind to weight it).
        main_scale: side of the main object, as a fraction of the image side (low, high).
        distractor_scale: side of each other object, as a fraction of the image side; keep its
            high end below ``main_scale``'s low end so that the main object stays the largest.
        objects: number of objects per scene (low, high), the main one included.
    """

    backgrounds: tuple[str, ...] = BACKGROUNDS
    main_scale: tuple[float, float] = (0.4, 0.65)
    distractor_scale: tuple[float, float] = (0.15, 0.3)
    objects: tuple[int, int] = (1, 3)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.backgrounds) - set(BACKGROUNDS))
        if not self.backgrounds or unknown:
            raise ValueError(f"SceneOptions.backgrounds: unknown or none {unknown or '()'}")
        if not 0 < self.distractor_scale[1] < self.main_scale[0] <= self.main_scale[1] <= 1:
            raise ValueError(
                "SceneOptions: distractor_scale must lie below main_scale within (0, 1], got "
                f"{self.distractor_scale} and {self.main_scale}"
            )
        if not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"SceneOptions.objects must be 1 <= low <= high, got {self.objects}")


DEFAULT_OPTIONS = SceneOptions()


@dataclass
class SceneObject:
    """One drawn object: its class and box (x0, y0, x1, y1) in pixels."""

    class_id: int
    box: tuple[int, int, int, int]

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    def to_json(self) -> dict:
        shape, colour, _ = CLASSES[self.class_id]
        return {
            "class_id": self.class_id,
            "class": CLASS_NAMES[self.class_id],
            "shape": shape,
            "colour": colour,
            "box": list(self.box),
        }


def _polygon(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(phase + 2 * math.pi * i / n),
            cy + r * math.sin(phase + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box) -> None:
    """Draw a shape into a mask: 255 inside, 0 for holes and cut-outs."""
    fill, background = 255, 0
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if name == "circle":
        draw.ellipse(box, fill=fill)
    elif name == "square":
        draw.rectangle(box, fill=fill)
    elif name == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif name == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif name == "star":
        outer = _polygon(cx, cy, r, 5, -math.pi / 2)
        inner = _polygon(cx, cy, r * 0.4, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=fill)
    elif name == "cross":
        w = r / 3
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)
    elif name == "ring":
        draw.ellipse(box, fill=fill)
        w = r * 0.5
        draw.ellipse((cx - w, cy - w, cx + w, cy + w), fill=background)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
    elif name == "crescent":
        draw.ellipse(box, fill=fill)
        shift = r * 0.55
        draw.ellipse((x0 + shift, y0 - shift * 0.3, x1 + shift, y1 - shift * 0.3), fill=background)
    elif name == "bar":
        h = r / 3.5
        draw.rectangle((x0, cy - h, x1, cy + h), fill=fill)
    else:
        raise ValueError(f"unknown shape {name!r}")


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    base = rng.integers(0, 256, size=3)
    if kind == "plain":
        return np.broadcast_to(base, (size, size, 3)).astype(np.uint8)
    # Textures stay low-contrast so that the objects remain the salient content.
    other = np.clip(base + rng.integers(-60, 61, size=3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "gradient":
        t = (xx if rng.random() < 0.5 else yy)[..., None] / max(size - 1, 1)
        img = base * (1 - t) + other * t
    elif kind == "stripes":
        period = rng.integers(4, 12) * size / 64
        t = ((xx + yy * rng.integers(0, 2)) // max(period / 2, 1) % 2)[..., None]
        img = base * (1 - t) + other * t
    elif kind == "checker":
        cell = max(int(rng.integers(4, 12) * size / 64), 1)
        t = ((xx // cell + yy // cell) % 2)[..., None]
        img = base * (1 - t) + other * t
    else:
        img = base + rng.normal(0, 20, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _overlaps(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def position_words(box, size: int) -> str:
    """Where a box's centre lies: 'top left', 'centre', 'bottom', ..."""
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def caption(objects: list[SceneObject], background: str, size: int) -> str:
    """A caption naming each object, its colour and where it is, main object first."""
    parts = []
    for o in objects:
        where = position_words(o.box, size)
        name = CLASS_NAMES[o.class_id]
        article = "an" if name[0] in "aeiou" else "a"
        place = "in the centre" if where == "centre" else f"at the {where}"
        parts.append(f"{article} {name} {place}")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text} on a {background} background"


def generate_scene(
    seed: int, split: str, index: int, size: int = 64, options: SceneOptions = DEFAULT_OPTIONS
):
    """One scene: (PIL image, label, caption, metadata dict with every object's box)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLIT_OFFSETS[split] + index])
    background = options.backgrounds[rng.integers(len(options.backgrounds))]
    pixels = _background(rng, background, size)
    count = int(rng.integers(options.objects[0], options.objects[1] + 1))
    # The main object is the largest; the others are distractors.
    sides = [int(rng.uniform(*options.main_scale) * size)]
    sides += [int(rng.uniform(*options.distractor_scale) * size) for _ in range(count - 1)]
    objects: list[SceneObject] = []
    for side in sides:
        for _ in range(20):
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if not any(_overlaps(box, o.box) for o in objects):
                break
        else:
            continue
        objects.append(SceneObject(int(rng.integers(len(CLASSES))), box))
    image = Image.fromarray(pixels)
    for obj in reversed(objects):
        mask = Image.new("L", (size, size), 0)
        shape, _, colour = CLASSES[obj.class_id]
        _draw_shape(ImageDraw.Draw(mask), shape, obj.box)
        crop = Image.new("L", (size, size), 0)
        crop.paste(mask.crop(obj.box), obj.box[:2])
        image.paste(colour, (0, 0), crop)
    meta = {
        "objects": [o.to_json() for o in objects],
        "background": background,
        "size": [size, size],
    }
    return image, objects[0].class_id, caption(objects, background, size), meta


def scene_sample(
    seed: int, split: str, index: int, size: int = 64, options: SceneOptions = DEFAULT_OPTIONS
) -> dict:
    """A webdataset sample (encoded fields) for one scene."""
    image, label, text, meta = generate_scene(seed, split, index, size, options)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {
        "__key__": f"{split}-{index:08d}",
        "png": buffer.getvalue(),
        "cls": str(label).encode(),
        "txt": text.encode(),
        "json": json.dumps(meta).encode(),
    }
