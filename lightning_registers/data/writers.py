"""Writing webdataset shards: the demo scenes, an ImageFolder tree, or a CSV/JSONL caption table.

Every writer goes through webdataset's ``ShardWriter`` (``maxcount``/``maxsize`` per shard),
shows a progress bar, skips unreadable inputs with the reason, and ends with a summary.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from .samples import open_image
from .scenes import CLASS_NAMES, scene_sample

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class WriteSummary:
    """What a writer wrote and what it skipped (reason -> count, plus the first examples)."""

    samples: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, item: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(f"{item}: {reason}")

    def __str__(self) -> str:
        lines = [
            f"wrote {self.samples} samples to {len(self.shards)} shards "
            f"({self.bytes / 2**20:.1f} MiB)"
        ]
        if self.skipped:
            total = sum(self.skipped.values())
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            lines.append(f"skipped {total} inputs: {reasons}")
            lines += [f"  e.g. {example}" for example in self.skipped_examples]
        return "\n".join(lines)


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    prefix: str,
    maxcount: int = 1000,
    maxsize: float = 1e9,
    total: int | None = None,
    summary: WriteSummary | None = None,
    progress: bool = True,
) -> WriteSummary:
    """Write ``samples`` (webdataset dicts) to ``out_dir/prefix-%06d.tar``, replacing any
    earlier shards of that prefix so that no stale shard is read with the new ones."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summary or WriteSummary()
    for stale in out_dir.glob(f"{prefix}-*.tar"):
        stale.unlink()
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as sink:
        for sample in tqdm(samples, total=total, desc=prefix, disable=not progress, unit="img"):
            sink.write(sample)
            summary.samples += 1
    shards = sorted(str(p) for p in out_dir.glob(f"{prefix}-*.tar"))
    summary.shards += shards
    summary.bytes += sum(os.path.getsize(p) for p in shards)
    return summary


def write_demo_shards(
    out: str | os.PathLike = "data/demo",
    train: int = 20000,
    val: int = 2000,
    size: int = 64,
    seed: int = 0,
    maxcount: int = 1000,
    maxsize: float = 1e9,
    progress: bool = True,
) -> WriteSummary:
    """Write the generated scene dataset to ``out/train`` and ``out/val`` plus ``classes.json``."""
    if not 8 <= size <= 224:
        raise ValueError(f"size must be between 8 and 224 pixels, got {size}")
    out = Path(out)
    summary = WriteSummary()
    for split, count in (("train", train), ("val", val)):
        samples = (scene_sample(seed, split, i, size) for i in range(count))
        write_shards(
            samples, out / split, f"demo-{split}", maxcount, maxsize, count, summary, progress
        )
    (out / "classes.json").write_text(json.dumps(list(CLASS_NAMES)))
    return summary


def _encoded_image(path: Path) -> tuple[str, bytes]:
    """The file's bytes and webdataset extension, after checking that it decodes as the
    training stream will decode it."""
    ext = IMAGE_EXTENSIONS.get(path.suffix.lower())
    if ext is None:
        raise ValueError(f"not an image extension ({path.suffix})")
    data = path.read_bytes()
    open_image(data)
    return ext, data


def _files(folder: Path, summary: WriteSummary, above: frozenset = frozenset()) -> list[Path]:
    """The files under ``folder``, sorted, following symbolic links as torchvision's
    ImageFolder does, but never into a folder that is already on the path (a link loop); a
    loop or an entry that cannot be read is skipped with the reason."""
    info = folder.stat()
    above = above | {(info.st_dev, info.st_ino)}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exn:
        summary.skip(str(folder), f"{type(exn).__name__}: {exn.strerror}")
        return []
    files = []
    for entry in entries:
        try:
            info = entry.stat()
        except OSError as exn:  # a broken link, or a link to itself
            summary.skip(str(entry), f"{type(exn).__name__}: {exn.strerror}")
            continue
        if not stat.S_ISDIR(info.st_mode):
            files.append(entry)
        elif (info.st_dev, info.st_ino) in above:
            summary.skip(str(entry), "symbolic link loop")
        else:
            files += _files(entry, summary, above)
    return files


def _folder_samples(
    root: Path, files: dict[str, list[Path]], summary: WriteSummary
) -> Iterator[dict]:
    for label, (name, paths) in enumerate(files.items()):
        for path in paths:
            try:
                ext, data = _encoded_image(path)
            except Exception as exn:
                summary.skip(str(path), type(exn).__name__ + ": " + str(exn).split("\n")[0])
                continue
            rel = path.relative_to(root)
            yield {
                "__key__": str(rel.with_suffix("")).replace("/", "_").replace(".", "_"),
                ext: data,
                "cls": str(label).encode(),
                "txt": f"a photo of a {name}.".encode(),
                "json": json.dumps({"class": name, "path": str(rel)}).encode(),
            }


def write_folder_shards(
    root: str | os.PathLike,
    out: str | os.PathLike,
    prefix: str = "shard",
    maxcount: int = 1000,
    maxsize: float = 1e9,
    progress: bool = True,
) -> WriteSummary:
    """Shards from an ImageFolder tree (one sub-folder a class, sorted names give the labels;
    symbolic links followed, link loops skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders")
    summary = WriteSummary()
    top = frozenset({(root.stat().st_dev, root.stat().st_ino)})  # a link to the root loops too
    files = {name: _files(root / name, summary, top) for name in classes}
    total = sum(len(paths) for paths in files.values())
    samples = _folder_samples(root, files, summary)
    write_shards(samples, out, prefix, maxcount, maxsize, total, summary, progress)
    Path(out, "classes.json").write_text(json.dumps(classes))
    return summary


def read_table(path: Path) -> list[dict]:
    """Rows of a CSV (header line) or JSONL file."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _table_samples(
    rows: list[dict],
    base: Path,
    image_column: str,
    caption_column: str,
    label_column: str | None,
    summary: WriteSummary,
) -> Iterator[dict]:
    for i, row in enumerate(rows):
        where = f"row {i + 1}"
        try:
            path = Path(row[image_column])
            caption = row[caption_column]
            ext, data = _encoded_image(path if path.is_absolute() else base / path)
            sample = {"__key__": f"{i:09d}", ext: data, "txt": str(caption).encode()}
            if label_column:
                sample["cls"] = str(int(row[label_column])).encode()
        except KeyError as exn:
            summary.skip(where, f"missing column {exn}")
            continue
        except Exception as exn:
            summary.skip(
                f"{where} ({row.get(image_column)})",
                type(exn).__name__ + ": " + str(exn).split("\n")[0],
            )
            continue
        yield sample


def write_table_shards(
    table: str | os.PathLike,
    out: str | os.PathLike,
    image_column: str = "filepath",
    caption_column: str = "caption",
    label_column: str | None = None,
    prefix: str = "shard",
    maxcount: int = 1000,
    maxsize: float = 1e9,
    progress: bool = True,
) -> WriteSummary:
    """Shards from a CSV or JSONL table of image paths (relative to the table) and captions."""
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"table {table} does not exist")
    rows = read_table(table)
    if rows and image_column not in rows[0]:
        raise KeyError(f"column {image_column!r} not in {table} (columns: {list(rows[0])})")
    if rows and caption_column not in rows[0]:
        raise KeyError(f"column {caption_column!r} not in {table} (columns: {list(rows[0])})")
    summary = WriteSummary()
    samples = _table_samples(
        rows, table.parent, image_column, caption_column, label_column, summary
    )
    return write_shards(samples, out, prefix, maxcount, maxsize, len(rows), summary, progress)
