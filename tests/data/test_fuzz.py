"""Generated bad shards and folders through the data path. For each case: no crash, no hang (the
stream runs under a deadline), the exact skip count, and every good sample used exactly once."""

import contextlib
import gzip
import io
import json
import signal
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from demo_run import quiet_trainer
from PIL import Image

from lightning_registers.data import (
    NoReadableSampleError,
    ShardDataModule,
    ShardLoader,
    ShardStream,
    write_folder_shards,
)
from lightning_registers.data.samples import decode_image, decode_label
from lightning_registers.data.scenes import scene_sample
from lightning_registers.models import RegisterViT
from lightning_registers.objectives import SupervisedModule

NUM_CLASSES = 10


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: a TimeoutError in the main thread after ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"the data path ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


def good(key: str, label: int = 1) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", png(hash(key) % 1000)), (f"{key}.cls", str(label).encode())]


def tar(members: list[tuple[str, bytes]], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info in extra:
            archive.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def member_offset(data: bytes, name: str, inside: bool) -> int:
    """Where member ``name`` starts in the tar ``data``: its header, or the middle of its data."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        member = archive.getmember(name)
    return member.offset_data + member.size // 2 if inside else member.offset


def decode(sample: dict) -> dict:
    """The fuzz transform: the sample's key, label (-1 where none) and mean colour."""
    image = np.asarray(decode_image(sample), dtype=np.float32)
    label = decode_label(sample) if "cls" in sample else -1
    return {"key": sample["__key__"], "label": label, "mean": torch.tensor(image.mean((0, 1)))}


def keys(n: int, prefix: str = "a") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def six_samples() -> bytes:
    return tar([m for k in keys(6) for m in good(k)])


def oriented() -> bytes:
    image = Image.new("RGB", (4, 2))
    exif = image.getexif()
    exif[0x0112] = 8
    return encode(image, exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)


def transparent_palette() -> bytes:
    image = Image.new("P", (4, 4))
    image.putpalette([255, 0, 0] * 256)
    return encode(image, transparency=0)


def odd_modes() -> list[tuple[str, bytes]]:
    images = {
        "exif": oriented(),
        "apng": animated("PNG"),
        "awebp": animated("WEBP"),
        "palette": transparent_palette(),
        "sixteen": encode(Image.fromarray(np.full((4, 4), 40000, np.uint16))),
        "la": encode(Image.new("LA", (4, 4), (10, 100))),
        "cmyk": encode(Image.new("CMYK", (4, 4), (0, 255, 0, 0)), "JPEG"),
        "float": encode(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF"),
    }
    ext = {"cmyk": "jpg", "awebp": "webp"}
    return [(f"{k}.{ext.get(k, 'png')}", data) for k, data in images.items()]


def directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def noisy(key: str, seed: int) -> list[tuple[str, bytes]]:
    """A sample whose PNG does not compress (32x32 noise, about 3 kB)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return [(f"{key}.png", encode(Image.fromarray(pixels))), (f"{key}.cls", b"1")]


# name: (shards as (suffix, bytes), good keys in order of use, skips)
CASES = {
    "zero-byte tar": ([(".tar", b"")], [], 1),
    "not a tar": ([(".tar", b"not a tar archive " * 40)], [], 1),
    "tar cut inside a member": (
        [(".tar", six_samples()[: member_offset(six_samples(), "a3.png", inside=True)])],
        keys(3),
        1,  # the rest of the shard: a3 (in progress) to a5
    ),
    "tar cut at a member boundary": (
        [(".tar", six_samples()[: member_offset(six_samples(), "a3.png", inside=False)])],
        keys(2),
        1,  # a2 may have had more members: it goes with the rest
    ),
    "tars concatenated": ([(".tar", six_samples() + tar(good("b0")))], keys(6), 1),
    "gzip-compressed tar": ([(".tar.gz", gzip.compress(six_samples()))], keys(6), 0),
    "non-image bytes named .jpg": (
        [(".tar", tar(good("a0") + [("a1.jpg", b"GIF89a but not really"), ("a1.cls", b"1")]))],
        ["a0"],
        1,
    ),
    "empty members": (
        [(".tar", tar([("a0.png", b""), ("a0.cls", b"1"), ("a1.png", png(1)), ("a1.cls", b"")]))],
        [],
        2,
    ),
    "a member twice in a sample": (
        [(".tar", tar(good("a0") + [("a0.png", png(3))] + good("a1")))],
        ["a1"],
        1,
    ),
    "a key again later in the shard": (
        [(".tar", tar(good("a0") + good("a1") + good("a0")))],
        ["a0", "a1", "a0"],
        0,
    ),
    "labels": (
        [
            (
                ".tar",
                tar(
                    [
                        member
                        for i, raw in enumerate([b"3.0", b" 9\n", b"10", b"-1", b"3.5", b"abc"])
                        for member in [(f"l{i}.png", png(i)), (f"l{i}.cls", raw)]
                    ]
                ),
            )
        ],
        ["l0", "l1"],
        4,
    ),
    "missing image, missing label": (
        [(".tar", tar([("a0.cls", b"1"), ("a1.png", png(1))]))],
        ["a1"],
        1,
    ),
    "odd images": ([(".tar", tar(odd_modes()))], [n.split(".")[0] for n, _ in odd_modes()], 0),
    "oversized png": (
        [(".tar", tar([("big.png", encode(Image.new("1", (12000, 12000))))] + good("a0")))],
        ["a0"],
        1,
    ),
    "members that are no samples": (
        [(".tar", tar([("README", b"hi"), ("__index__", b"x")] + good("a0"), [directory("d")]))],
        ["a0"],
        0,
    ),
}


def write_case(root: Path, name: str) -> list[str]:
    shards, _, _ = CASES[name]
    urls = []
    for i, (suffix, data) in enumerate(shards):
        path = root / f"{name.replace(' ', '_').replace(',', '')}-{i}{suffix}"
        path.write_bytes(data)
        urls.append(str(path))
    return urls


def read(urls: list[str], num_workers: int = 0, seconds: float = 20.0):
    """Keys (in order of use), labels and skips of a validation pass through ``ShardLoader``,
    and the warnings it gave."""
    stream = ShardStream(urls, decode, train=False, num_classes=NUM_CLASSES)
    loader = ShardLoader(stream, batch_size=3, num_workers=num_workers)
    used, labels, skipped = [], [], 0
    with warnings.catch_warnings(record=True) as caught, deadline(seconds):
        warnings.simplefilter("always")
        for batch in loader:
            used += batch["key"]
            labels += batch["label"].tolist()
            skipped += int(batch["skipped"].sum())
    return used, labels, skipped, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_shard_is_skipped_exactly_and_good_samples_used_once(name, tmp_path):
    urls = write_case(tmp_path, name)
    _, expected, skips = CASES[name]
    if not expected:  # nothing readable at all: the pass gives up, naming the shard
        with pytest.raises(NoReadableSampleError, match=rf"{urls[0]}.*\({skips} skipped"):
            read(urls)
        return
    used, _, skipped, messages = read(urls)
    assert used == expected
    assert skipped == skips
    # Each skip named, up to three a shard.
    assert sum(m.startswith("skipped ") for m in messages) == min(skips, 3)


def test_truncated_gzip_tar_counts_its_rest_once_and_spills_nothing_into_the_next(tmp_path):
    members = [m for i, k in enumerate(keys(6)) for m in noisy(k, i)]
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(tar(members))[:9000])
    (tmp_path / "next.tar").write_bytes(tar(good("z0")))
    used, _, skipped, _ = read([str(tmp_path / "cut.tar.gz"), str(tmp_path / "next.tar")])
    assert used[:-1] == keys(6)[: len(used) - 1] and len(used) - 1 < 6
    assert used[-1] == "z0" and skipped == 1


def test_labels_are_read_as_documented(tmp_path):
    used, labels, _, messages = read(write_case(tmp_path, "labels"))
    assert dict(zip(used, labels, strict=True)) == {"l0": 3, "l1": 9}  # "3.0" is 3
    text = " ".join(messages)
    assert "class label 10 is out of range for num_classes=10" in text
    for raw in ("b'-1'", "b'3.5'"):  # and "abc", beyond the three warnings of a shard
        assert f"class label {raw} is not a non-negative integer" in text


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers", [2, 3])
def test_every_case_at_once_with_workers_sums_skips_exactly(tmp_path, num_workers):
    urls = [u for name in CASES for u in write_case(tmp_path, name)]
    used, _, skipped, _ = read(urls, num_workers=num_workers, seconds=60)
    assert sorted(used) == sorted(k for _, expected, _ in CASES.values() for k in expected)
    assert skipped == sum(skips for *_, skips in CASES.values())


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_sharing_one_shard_count_each_skip_once(tmp_path):
    members = []
    for i in range(20):
        members += good(f"s{i:02d}") if i % 3 else [(f"s{i:02d}.png", b"broken")]
    path = tmp_path / "one.tar"
    path.write_bytes(tar(members) + b"\x07" * 600)  # and junk after its end-of-archive marker
    used, _, skipped, _ = read([str(path)], num_workers=3)
    assert sorted(used) == [f"s{i:02d}" for i in range(20) if i % 3]
    assert skipped == 7 + 1


def test_a_worker_that_yields_nothing_still_reports_its_skips(tmp_path):
    (tmp_path / "good.tar").write_bytes(tar([m for k in keys(4) for m in good(k)]))
    (tmp_path / "bad.tar").write_bytes(tar([(f"x{i}.png", b"broken") for i in range(5)]))
    used, _, skipped, _ = read([str(tmp_path / "good.tar"), str(tmp_path / "bad.tar")], 2)
    assert sorted(used) == keys(4) and skipped == 5


def test_warnings_are_rate_limited_per_shard_and_the_skipped_share_is_reported(tmp_path):
    members = [(f"x{i:03d}.png", b"broken") for i in range(50)]
    members += [m for i in range(100) for m in good(f"g{i:03d}")]
    (tmp_path / "many.tar").write_bytes(tar(members))
    _, _, skipped, messages = read([str(tmp_path / "many.tar")])
    assert skipped == 50
    named = [m for m in messages if m.startswith("skipped sample")]
    assert [m.split()[2] for m in named] == ["x000", "x001", "x002", "x009"]  # 1-3, then 10th
    share = [m for m in messages if "more than 10%" in m]
    assert len(share) == 1 and share[0].startswith("50 of the 100 ")  # checked at 100, 200...


def training(urls: list[str], monkeypatch, worker: int = 0, num_workers: int = 1) -> None:
    """A training epoch read in this process as DataLoader worker ``worker`` of ``num_workers``
    (webdataset reads the slot from the environment; a worker process that raises costs the
    DataLoader seconds to shut down)."""
    monkeypatch.setenv("WORKER", str(worker))
    monkeypatch.setenv("NUM_WORKERS", str(num_workers))
    # A small shuffle buffer: a pass is judged once all its samples left the buffer.
    stream = ShardStream(
        urls, decode, train=True, samples_per_epoch=32, batch_size=4, shuffle_buffer=20
    )
    with deadline(30), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(ShardLoader(stream, batch_size=4))


@pytest.mark.parametrize(("worker", "num_workers"), [(0, 1), (1, 2)])
def test_training_on_zero_byte_shards_gives_up_naming_them(
    tmp_path, monkeypatch, worker, num_workers
):
    urls = []
    for i in range(4):
        (tmp_path / f"empty-{i}.tar").write_bytes(b"")
        urls.append(str(tmp_path / f"empty-{i}.tar"))
    with pytest.raises(NoReadableSampleError, match="in 1 whole pass over the shards") as error:
        training(urls, monkeypatch, worker, num_workers)
    named = {u for u in urls if u in str(error.value)}
    assert len(named) == 4 // num_workers  # this worker's share of the shards
    assert f"worker {worker} of {num_workers}" in str(error.value)
    assert f"{4 // num_workers} skipped" in str(error.value)


def test_training_on_undecodable_samples_gives_up(tmp_path, monkeypatch):
    (tmp_path / "bad.tar").write_bytes(tar([(f"x{i:03d}.png", b"broken") for i in range(300)]))
    with pytest.raises(NoReadableSampleError, match="bad.tar"):
        training([str(tmp_path / "bad.tar")], monkeypatch)


def test_training_with_fewer_shards_than_workers_gives_up_after_a_pass_per_worker(
    tmp_path, monkeypatch
):
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(NoReadableSampleError, match="in 2 whole passes"):
        training([str(tmp_path / "empty.tar")], monkeypatch, worker=1, num_workers=2)


@pytest.mark.parametrize(("worker", "num_workers"), [(0, 1), (2, 3)])
def test_training_with_a_few_good_samples_among_bad_ones_keeps_going(
    tmp_path, monkeypatch, worker, num_workers
):
    members = [(f"x{i:03d}.png", b"broken") for i in range(40)] + good("a0")
    (tmp_path / "mostly-bad.tar").write_bytes(tar(members))
    training([str(tmp_path / "mostly-bad.tar")], monkeypatch, worker, num_workers)


def test_validation_with_workers_on_bad_shards_only_gives_up_naming_them(tmp_path):
    (tmp_path / "bad.tar").write_bytes(tar([(f"x{i}.png", b"broken") for i in range(5)]))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(NoReadableSampleError, match=r"bad.tar.*empty.tar \(6 skipped"):
        read([str(tmp_path / "bad.tar"), str(tmp_path / "empty.tar")], num_workers=2)


def test_folder_with_link_loops_and_broken_links(tmp_path):
    root = tmp_path / "images"
    elsewhere = tmp_path / "elsewhere"
    for folder in (root / "cat" / "sub", root / "dog", elsewhere):
        folder.mkdir(parents=True)
    for path in (root / "cat" / "a.png", root / "cat" / "sub" / "b.png", elsewhere / "d.png"):
        path.write_bytes(png(len(path.name)))
    (root / "dog" / "c.png").write_bytes(png(7))
    (root / "cat" / "sub" / "up").symlink_to("..")  # back to cat: a loop
    (root / "cat" / "root").symlink_to(root)  # to the root: a loop too
    (root / "cat" / "self.png").symlink_to("self.png")  # a link to itself
    (root / "dog" / "gone.png").symlink_to(tmp_path / "missing.png")
    (root / "dog" / "more").symlink_to(elsewhere)  # followed, as ImageFolder does
    with deadline(20):
        summary = write_folder_shards(root, tmp_path / "out", progress=False)
    assert sum(summary.skipped.values()) == 4
    assert summary.skipped["symbolic link loop"] == 2
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    paths = {json.loads(s["json"])["path"]: int(s["cls"]) for s in samples}
    assert paths == {"cat/a.png": 0, "cat/sub/b.png": 0, "dog/c.png": 1, "dog/more/d.png": 1}


class FailureLog:
    """An objective's transform that appends the key of every sample it fails on to a file: an
    account of the transform's skips kept apart from the stream's counting."""

    def __init__(self, transform, path: Path) -> None:
        self.transform, self.path = transform, path

    def __call__(self, sample: dict) -> dict:
        try:
            return self.transform(sample)
        except Exception:
            with open(self.path, "a") as log:
                log.write(sample["__key__"] + "\n")
            raise


def scenes(split: str, start: int, count: int) -> list[tuple[str, bytes]]:
    return [
        (f"{sample['__key__']}.{ext}", sample[ext])
        for i in range(start, start + count)
        for sample in [scene_sample(0, split, i, 32)]
        for ext in ("png", "cls")
    ]


def test_a_fit_with_two_workers_logs_exact_skip_counts(tmp_path):
    broken = [(f"broken-{i}.png", b"not an image") for i in range(2)]
    train = []
    for i in range(4):  # 6 scenes and 2 broken images a shard
        train.append(tmp_path / f"train-{i}.tar")
        train[-1].write_bytes(tar(scenes("train", 6 * i, 6) + broken))
    val = [tmp_path / "val-good.tar", tmp_path / "val-bad.tar", tmp_path / "val-empty.tar"]
    labels = [("ten.png", png(10)), ("ten.cls", b"10"), ("minus.png", png(1)), ("minus.cls", b"-1")]
    val[0].write_bytes(tar(scenes("val", 0, 3) + broken + labels + scenes("val", 3, 3)))
    val[1].write_bytes(tar([(f"bad-{i}.png", b"not an image") for i in range(3)]))
    val[2].write_bytes(b"")
    model = SupervisedModule(
        RegisterViT("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
        num_classes=NUM_CLASSES,
        image_size=32,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
    )
    make_transform = model.make_transform
    model.make_transform = lambda train: FailureLog(
        make_transform(train), tmp_path / f"failed-{'train' if train else 'val'}.txt"
    )
    data = ShardDataModule(
        [str(p) for p in train],
        [str(p) for p in val],
        batch_size=4,
        num_workers=2,
        samples_per_epoch=32,
        num_classes=NUM_CLASSES,
        image_size=32,
    )
    trainer = quiet_trainer(
        max_epochs=2,
    )
    with deadline(120), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    metrics = trainer.callback_metrics
    # Validation: 2 broken images, 2 labels the model has no class for (which would crash its
    # accuracy), 3 broken images in a shard that yields nothing, a zero-byte shard.
    assert metrics["data/skipped_val"].item() == 2 + 2 + 3 + 1
    assert (tmp_path / "failed-val.txt").read_text().count("\n") == 2 * (2 + 3)  # two epochs
    failed_train = (tmp_path / "failed-train.txt").read_text().split()
    assert set(failed_train) == {"broken-0", "broken-1"}
    assert metrics["data/skipped_train"].item() == len(failed_train)
