"""Scene options: the drawn scenes follow them, and bad options fail before any drawing."""

import pytest

from lightning_registers.data.scenes import SceneOptions, generate_scene, scene_sample


def test_scenes_follow_their_options():
    options = SceneOptions(
        backgrounds=("plain",), main_scale=(0.2, 0.25), distractor_scale=(0.1, 0.15), objects=(3, 3)
    )
    for index in range(30):
        _, label, _, meta = generate_scene(0, "train", index, 96, options)
        assert meta["background"] == "plain"
        sides = [o["box"][2] - o["box"][0] for o in meta["objects"]]
        assert int(0.2 * 96) <= sides[0] <= int(0.25 * 96)
        assert all(int(0.1 * 96) <= s <= int(0.15 * 96) for s in sides[1:])
        assert meta["objects"][0]["class_id"] == label
        assert 1 <= len(sides) <= 3  # a distractor that finds no free place is left out
    counts = [len(generate_scene(0, "train", i, 96, options)[3]["objects"]) for i in range(30)]
    assert counts.count(3) > 20
    assert scene_sample(0, "val", 4, 64, options) == scene_sample(0, "val", 4, 64, options)
    assert scene_sample(0, "val", 4, 64, options) != scene_sample(0, "val", 4, 64)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(backgrounds=("plain", "marble")), "backgrounds"),
        (dict(main_scale=(0.2, 0.3)), "distractor_scale must lie below main_scale"),
        (dict(objects=(0, 2)), "objects"),
    ],
)
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        SceneOptions(**options)
