"""Shards written by our writers read back exactly; bad inputs are skipped with a reason."""

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from lightning_registers.data import (
    CLASS_NAMES,
    generate_scene,
    write_demo_shards,
    write_folder_shards,
    write_table_shards,
)
from lightning_registers.data.scenes import scene_sample


def read_all(pattern):
    return list(wds.WebDataset(pattern, shardshuffle=False))


def test_demo_shards_read_back_exactly_what_was_generated(tmp_path):
    summary = write_demo_shards(
        tmp_path, train=30, val=10, size=48, seed=3, maxcount=8, progress=False
    )
    assert summary.samples == 40 and len(summary.shards) == 4 + 2
    train = read_all(str(tmp_path / "train" / "demo-train-{000000..000003}.tar"))
    assert [s["__key__"] for s in train] == [f"train-{i:08d}" for i in range(30)]
    for i, sample in enumerate(train):
        image, label, caption, meta = generate_scene(3, "train", i, 48)
        assert int(sample["cls"]) == label
        assert sample["txt"].decode() == caption
        assert json.loads(sample["json"]) == meta
        decoded = np.asarray(Image.open(io.BytesIO(sample["png"])))
        np.testing.assert_array_equal(decoded, np.asarray(image))
    assert json.loads((tmp_path / "classes.json").read_text()) == list(CLASS_NAMES)


def test_demo_scenes_are_deterministic_for_a_seed_and_differ_across_seeds():
    a = scene_sample(0, "train", 7, 64)
    assert a == scene_sample(0, "train", 7, 64)
    assert a["png"] != scene_sample(1, "train", 7, 64)["png"]
    assert a["png"] != scene_sample(0, "val", 7, 64)["png"]


def test_demo_scene_truths_are_consistent():
    labels = set()
    for i in range(200):
        image, label, caption, meta = generate_scene(0, "train", i, 64)
        objects = meta["objects"]
        assert 1 <= len(objects) <= 3 and image.size == (64, 64)
        main = objects[0]
        assert label == main["class_id"] and CLASS_NAMES[label] == main["class"]
        areas = [(o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) for o in objects]
        assert areas[0] == max(areas)
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert o["class"] == f"{o['colour']} {o['shape']}" and o["class"] in caption
        labels.add(label)
    assert labels == set(range(len(CLASS_NAMES)))


def test_demo_size_bounds_are_checked(tmp_path):
    with pytest.raises(ValueError, match="size"):
        write_demo_shards(tmp_path, train=1, val=1, size=256, progress=False)


def _save(path, colour, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format=fmt)


def test_folder_shards_keep_labels_and_skip_broken_files(tmp_path):
    root = tmp_path / "images"
    _save(root / "cat" / "a.png", (255, 0, 0))
    _save(root / "cat" / "b.jpg", (250, 0, 0), "JPEG")
    _save(root / "dog" / "c.png", (0, 0, 255))
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    (root / "dog" / "notes.txt").write_text("hello")
    summary = write_folder_shards(root, tmp_path / "out", maxcount=2, progress=False)
    assert summary.samples == 3 and len(summary.shards) == 2
    assert sum(summary.skipped.values()) == 2
    assert any("broken.png" in e for e in summary.skipped_examples)
    assert "skipped 2 inputs" in str(summary)
    samples = read_all(str(tmp_path / "out" / "shard-{000000..000001}.tar"))
    by_path = {json.loads(s["json"])["path"]: s for s in samples}
    assert int(by_path["cat/a.png"]["cls"]) == 0 and int(by_path["dog/c.png"]["cls"]) == 1
    assert "jpg" in by_path["cat/b.jpg"]
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_table_shards_keep_captions_and_skip_missing_files(tmp_path, fmt):
    _save(tmp_path / "img" / "x.png", (1, 2, 3))
    _save(tmp_path / "img" / "y.png", (4, 5, 6))
    rows = [("img/x.png", "a red thing"), ("img/missing.png", "gone"), ("img/y.png", "blue")]
    table = tmp_path / f"captions.{fmt}"
    if fmt == "csv":
        table.write_text("filepath,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    else:
        table.write_text("".join(json.dumps({"filepath": p, "caption": c}) + "\n" for p, c in rows))
    summary = write_table_shards(table, tmp_path / "out", progress=False)
    assert summary.samples == 2 and sum(summary.skipped.values()) == 1
    assert "missing.png" in summary.skipped_examples[0]
    samples = read_all(str(tmp_path / "out" / "shard-000000.tar"))
    assert [s["txt"].decode() for s in samples] == ["a red thing", "blue"]


def test_table_with_wrong_column_names_the_column(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("path,caption\nx.png,hi\n")
    with pytest.raises(KeyError, match="filepath"):
        write_table_shards(table, tmp_path / "out", progress=False)


def test_rewriting_removes_stale_shards(tmp_path):
    write_demo_shards(tmp_path, train=20, val=2, size=16, maxcount=5, progress=False)
    write_demo_shards(tmp_path, train=6, val=2, size=16, maxcount=5, progress=False)
    assert len(list((tmp_path / "train").glob("*.tar"))) == 2
    with tarfile.open(tmp_path / "train" / "demo-train-000001.tar") as tar:
        assert len(tar.getnames()) == 4
