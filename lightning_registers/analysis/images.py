"""The images an analysis runs on, with their labels and ground-truth boxes: webdataset shards
(boxes from each sample's ``.json``, as the demo scenes write them) or a folder of image files
(boxes from Pascal-VOC XML files beside them or in a sibling ``Annotations/`` folder)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2

from ..data.samples import IMAGE_KEYS, decode_image, decode_label, decode_meta
from ..data.stream import SkipCounter, expand_urls

FOLDER_SUFFIXES = {f".{key}" for key in IMAGE_KEYS}


@dataclass
class ImageSet:
    """Images resized to a square side (aspect ratio not kept, so every box scales with its
    image), normalized, with what is known of each.

    Attributes:
        images: (N, 3, S, S) normalized images.
        labels: (N,) class labels, -1 where unknown.
        boxes: per image, (K, 4) ground-truth boxes (x0, y0, x1, y1) in pixels of the resized
            image (K = 0 where none are known).
        names: per image, the sample key or file path.
        skipped: samples or files that could not be read (each named in a warning).
        source: what the images were read from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    boxes: list[torch.Tensor]
    names: list[str]
    skipped: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)


def voc_boxes(xml_path: Path) -> list[tuple[float, float, float, float]]:
    """Object boxes of a Pascal-VOC annotation as (x0, y0, x1, y1), 0-based with exclusive
    ends (VOC's corners are 1-based and inclusive)."""
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        x0, y0, x1, y1 = (float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x0 - 1, y0 - 1, x1, y1))
    return boxes


def _voc_annotation(image_path: Path) -> Path | None:
    for candidate in (
        image_path.with_suffix(".xml"),
        image_path.parent.parent / "Annotations" / f"{image_path.stem}.xml",
    ):
        if candidate.is_file():
            return candidate
    return None


def _scaled(boxes, original: tuple[int, int], side: int) -> torch.Tensor:
    width, height = original
    scale = torch.tensor([side / width, side / height, side / width, side / height])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale


def _shard_items(urls: list[str], counter: SkipCounter):
    for sample in wds.tarfile_samples([{"url": u} for u in urls], handler=counter.shard_error):
        where = f"sample {sample.get('__key__')} in shard {sample.get('__url__')}"
        try:
            image = decode_image(sample)
            label = decode_label(sample) if "cls" in sample else -1
            meta = decode_meta(sample) if "json" in sample else {}
            boxes = [o["box"] for o in meta.get("objects", []) if "box" in o]
        except Exception as exn:  # noqa: BLE001 - any unreadable sample is skipped and counted
            counter.record(where, exn)
            continue
        yield sample["__key__"], image, label, boxes


def _folder_items(root: Path, counter: SkipCounter):
    if (root / "JPEGImages").is_dir():
        root = root / "JPEGImages"  # a VOCdevkit year folder: not its segmentation PNGs
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"folder {root} holds no images ({', '.join(FOLDER_SUFFIXES)})")
    # Images in several class sub-folders (an ImageFolder tree) get the folder as their label.
    classes = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
    labelled = len(classes) > 1 and all(p.parent != root for p in files)
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
            annotation = _voc_annotation(path)
            boxes = voc_boxes(annotation) if annotation else []
        except Exception as exn:  # noqa: BLE001 - any unreadable file is skipped and counted
            counter.record(f"image {path}", exn)
            continue
        label = classes.index(path.relative_to(root).parts[0]) if labelled else -1
        yield str(path), image, label, boxes


def load_images(
    source: str | Path,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    limit: int = 256,
) -> ImageSet:
    """The first ``limit`` readable images of ``source`` (shard URLs or patterns, or a folder),
    resized to ``image_size`` squared and normalized with ``mean``/``std``."""
    counter = SkipCounter()
    path = Path(source)
    if path.is_dir():
        items = _folder_items(path, counter)
    else:
        items = _shard_items(expand_urls(str(source)), counter)
    to_tensor = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    pixels, labels, boxes, names = [], [], [], []
    for name, image, label, image_boxes in items:
        pixels.append(to_tensor(image).clamp(0, 1))
        labels.append(label)
        boxes.append(_scaled(image_boxes, image.size, image_size))
        names.append(name)
        if len(pixels) == limit:
            break
    if not pixels:
        raise FileNotFoundError(f"no readable image in {source} ({counter.total} skipped)")
    normalized = v2.Normalize(mean, std)(torch.stack(pixels))
    return ImageSet(normalized, torch.tensor(labels), boxes, names, counter.total, str(source))
