"""The images an analysis runs on, with their labels and ground-truth boxes: webdataset shards
(boxes from each sample's ``.json``, as the demo scenes write them) or a folder of image files
(boxes from Pascal-VOC XML files beside them or in a sibling ``Annotations/`` folder).

The images are read from their source in batches, once for every pass a measure makes over
them, and never held all at once: what is kept per image is what is known of it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds
from torchvision.transforms import v2

from ..data.samples import IMAGE_KEYS, decode_image, decode_label, decode_meta, open_image
from ..data.stream import SkipCounter, expand_urls

FOLDER_SUFFIXES = {f".{key}" for key in IMAGE_KEYS}
HARD_TAGS = ("difficult", "truncated")  # objects the reference's --no_hard leaves out
_TO_FLOAT = v2.ToDtype(torch.float32, scale=True)


@dataclass
class ImageSet:
    """Images of ``source`` resized to a square side (aspect ratio not kept, so every box
    scales with its image) and normalized, read in batches from the source at each pass
    (``batches``), with what is known of each.

    Attributes:
        source: what the images are read from (shard URLs or patterns, or a folder).
        image_size: the square side S.
        labels: (N,) class labels, -1 where unknown.
        boxes: per image, (K, 4) ground-truth boxes (x0, y0, x1, y1) in pixels of the resized
            image (K = 0 where none are known).
        names: per image, the sample key or file path.
        skipped: samples or files that could not be read (each named in a warning).
        sizes: per image, (height, width) as read.
        hard: per image, (K,) flags of the boxes of difficult or truncated objects (VOC).
        original_boxes: per image, the boxes in pixels of the image as read.
        originals: per image, the image as read, (3, H, W) uint8, where kept on request (then
            passes read them rather than the source).
        mean: the normalization's mean.
        std: the normalization's standard deviation.
    """

    source: str
    image_size: int
    labels: torch.Tensor
    boxes: list[torch.Tensor]
    names: list[str]
    skipped: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)
    hard: list[torch.Tensor] = field(default_factory=list)
    original_boxes: list[torch.Tensor] = field(default_factory=list)
    originals: list[torch.Tensor] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __len__(self) -> int:
        return len(self.names)

    def read(self) -> Iterator[torch.Tensor]:
        """Each image as read, (3, H, W) uint8, in order: from the source again (its bad
        samples skipped quietly, as they were counted when the set was loaded), or the kept
        ``originals``."""
        if self.originals is not None:
            yield from self.originals
            return
        count = 0
        for count, (name, image, *_) in enumerate(_items(self.source, _Recount()), 1):
            if name != self.names[count - 1]:
                raise RuntimeError(
                    f"{self.source} changed while it was analysed: image {count - 1} is {name}, "
                    f"was {self.names[count - 1]}"
                )
            yield v2.functional.to_image(image)
            if count == len(self):
                return
        raise RuntimeError(
            f"{self.source} changed while it was analysed: {count} of its {len(self)} images left"
        )

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The images in order, resized and normalized, ``batch_size`` at a time: (B, 3, S, S)."""
        normalize = v2.Normalize(self.mean, self.std)
        chunk: list[torch.Tensor] = []
        for image in self.read():
            chunk.append(square(image, self.image_size))
            if len(chunk) == batch_size:
                yield normalize(torch.stack(chunk))
                chunk = []
        if chunk:
            yield normalize(torch.stack(chunk))

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` images (all of them where there are fewer), (n, 3, S, S)."""
        return next(self.batches(n))

    @property
    def images(self) -> torch.Tensor:
        """Every image at once, (N, 3, S, S): for a few images in a notebook (the analysis
        reads ``batches``, which hold one batch at a time)."""
        return torch.cat(list(self.batches(256)))

    def full_resolution(self) -> Iterator[torch.Tensor]:
        """Each image as read, normalized, (3, H, W), one at a time."""
        normalize = v2.Normalize(self.mean, self.std)
        for image in self.read():
            yield normalize(image.float() / 255)

    def to_square(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes`` (N, 4), one in pixels of each image as read, in pixels of the square."""
        side = self.image_size
        return torch.cat(
            [_scaled(b, (w, h), side) for b, (h, w) in zip(boxes, self.sizes, strict=True)]
        )


class _Recount(SkipCounter):
    """The skip counter of a second read: its skips were named and counted by the first."""

    def record(self, where: str, exn: BaseException, shard: str | None = None) -> None:
        pass


def square(image: torch.Tensor, side: int) -> torch.Tensor:
    """``image`` (3, H, W) uint8 resized to ``side`` squared (bicubic), as floats in [0, 1]."""
    resize = v2.Resize((side, side), interpolation=v2.InterpolationMode.BICUBIC)
    return _TO_FLOAT(resize(image)).clamp(0, 1)


def voc_boxes(xml_path: Path) -> tuple[list[tuple[float, ...]], list[bool]]:
    """Object boxes of a Pascal-VOC annotation as (x0, y0, x1, y1), 0-based with exclusive
    ends (VOC's corners are 1-based and inclusive), and whether each object is marked
    difficult or truncated."""
    root = ET.parse(xml_path).getroot()
    boxes, hard = [], []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        x0, y0, x1, y1 = (float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x0 - 1, y0 - 1, x1, y1))
        hard.append(any(obj.findtext(tag, "0").strip() == "1" for tag in HARD_TAGS))
    return boxes, hard


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
    return torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale


def _shard_items(urls: list[str], counter: SkipCounter):
    for sample in wds.tarfile_samples([{"url": u} for u in urls], handler=counter.shard_error):
        where = f"sample {sample.get('__key__')} in shard {sample.get('__url__')}"
        try:
            image = decode_image(sample)
            label = decode_label(sample) if "cls" in sample else -1
            meta = decode_meta(sample) if "json" in sample else {}
            objects = [o for o in meta.get("objects", []) if "box" in o]
            boxes = [o["box"] for o in objects]
            hard = [any(bool(o.get(tag)) for tag in HARD_TAGS) for o in objects]
        except Exception as exn:  # noqa: BLE001 - any unreadable sample is skipped and counted
            counter.record(where, exn)
            continue
        yield sample["__key__"], image, label, boxes, hard


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
            image = open_image(path.read_bytes())  # as the training stream decodes it
            annotation = _voc_annotation(path)
            boxes, hard = voc_boxes(annotation) if annotation else ([], [])
        except Exception as exn:  # noqa: BLE001 - any unreadable file is skipped and counted
            counter.record(f"image {path}", exn)
            continue
        label = classes.index(path.relative_to(root).parts[0]) if labelled else -1
        yield str(path), image, label, boxes, hard


def _items(source: str, counter: SkipCounter):
    """(name, image, label, boxes, hard) of each readable image of ``source``, in order."""
    path = Path(source)
    if path.is_dir():
        return _folder_items(path, counter)
    return _shard_items(expand_urls(source), counter)


def load_images(
    source: str | Path,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    limit: int = 256,
    keep_originals: bool = False,
) -> ImageSet:
    """The first ``limit`` readable images of ``source`` (shard URLs or patterns, or a folder),
    to be resized to ``image_size`` squared and normalized with ``mean``/``std``: one read of
    the source for what is known of each image, its pixels left there (with
    ``keep_originals``, the images as read are kept in memory instead)."""
    counter = SkipCounter()
    labels, boxes, names, sizes, hard, original_boxes, originals = ([] for _ in range(7))
    for name, image, label, image_boxes, image_hard in _items(str(source), counter):
        labels.append(label)
        boxes.append(_scaled(image_boxes, image.size, image_size))
        names.append(name)
        sizes.append((image.height, image.width))
        hard.append(torch.tensor(image_hard, dtype=torch.bool))
        original_boxes.append(torch.tensor(image_boxes, dtype=torch.float32).reshape(-1, 4))
        if keep_originals:
            originals.append(v2.functional.to_image(image))
        if len(names) == limit:
            break
    if not names:
        raise FileNotFoundError(f"no readable image in {source} ({counter.total} skipped)")
    return ImageSet(
        str(source),
        image_size,
        torch.tensor(labels),
        boxes,
        names,
        counter.total,
        sizes,
        hard,
        original_boxes,
        originals if keep_originals else None,
        tuple(mean),
        tuple(std),
    )
