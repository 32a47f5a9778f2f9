"""The procedural scene generator: determinism, label consistency, the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualhead.dense import scenes as scenes_module
from dualhead.dense.scenes import ARRAYS, CLASS_NAMES, SceneSpec, load_scenes, render_split

SPEC = SceneSpec(image_size=32, seed=3)


@pytest.fixture(scope="module")
def rendered():
    return render_split(SPEC, "train", 12)


def plane_depth(scene: dict, size: int) -> np.ndarray:
    """The background plane's depth from its stored parameters (independent of the renderer's code path)."""
    v, u = np.mgrid[0:size, 0:size] + 0.5
    gx, gy = scene["plane"]["slope"]
    return scene["plane"]["depth"] * (1 + gx * (u - size / 2) / size + gy * (v - size / 2) / size)


def test_same_seed_same_scenes_other_seed_or_split_other_scenes(rendered):
    again = render_split(SPEC, "train", 12)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(again, name), getattr(rendered, name))
    assert again.objects == rendered.objects
    assert not np.array_equal(render_split(SceneSpec(image_size=32, seed=4), "train", 12).image, rendered.image)
    assert not np.array_equal(render_split(SPEC, "val", 12).image, rendered.image)


def test_a_scene_does_not_depend_on_the_split_size(rendered):
    """Scene i comes from its own generator: a smaller split is a prefix of a larger one
    (across render chunks too)."""
    fewer = render_split(SPEC, "train", 5)
    np.testing.assert_array_equal(fewer.image, rendered.image[:5])
    assert fewer.objects == rendered.objects[:5]


def test_arrays_have_the_documented_types_and_ranges(rendered):
    n, size = 12, SPEC.image_size
    assert rendered.image.shape == (n, size, size, 3) and rendered.image.dtype == np.uint8
    assert rendered.seg.shape == (n, size, size) and rendered.seg.max() < len(CLASS_NAMES)
    assert rendered.depth.dtype == np.float32 and rendered.depth.min() > 0
    assert rendered.normals.shape == (n, size, size, 3) and rendered.normals.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rendered.normals, axis=-1), 1.0, atol=1e-5)
    assert (rendered.normals[..., 2] < 0).all()  # every visible surface faces the camera
    assert len(np.unique(rendered.seg)) > 3  # several classes occur
    assert rendered.image.std() > 20  # not a blank image


def test_background_pixels_are_the_plane_and_objects_are_in_front_of_it(rendered):
    for i, scene in enumerate(rendered.objects):
        plane = plane_depth(scene, SPEC.image_size)
        background = rendered.seg[i] == 0
        np.testing.assert_array_equal(background, rendered.instance[i] == 0)
        np.testing.assert_allclose(rendered.depth[i][background], plane[background], rtol=1e-5)
        assert (rendered.depth[i][~background] <= plane[~background] + 1e-5).all()
        gx, gy = scene["plane"]["slope"]
        expected = np.array([gx, gy, -1.0]) / np.linalg.norm([gx, gy, -1.0])
        np.testing.assert_allclose(rendered.normals[i][background], np.broadcast_to(expected, (background.sum(), 3)), atol=1e-5)


def test_objects_have_varying_normals_and_depth():
    """Objects are surfaces, not flat cut-outs: normals and depth vary inside a sphere."""
    scenes = render_split(SceneSpec(image_size=64, seed=0), "test", 20)
    for i, scene in enumerate(scenes.objects):
        for obj in scene["objects"]:
            pixels = scenes.instance[i] == obj["instance"]
            if obj["name"] == "sphere" and pixels.sum() > 50:
                assert np.ptp(scenes.depth[i][pixels]) > 0.05
                assert np.ptp(scenes.normals[i][pixels][:, 0]) > 0.5
                return
    pytest.fail("no sizeable sphere in 20 scenes")


def test_boxes_are_tight_around_each_objects_visible_pixels(rendered):
    checked = 0
    for i, scene in enumerate(rendered.objects):
        seen = set(np.unique(rendered.instance[i])) - {0}
        assert seen == {obj["instance"] for obj in scene["objects"]}  # hidden objects are left out
        for obj in scene["objects"]:
            rows, cols = np.nonzero(rendered.instance[i] == obj["instance"])
            assert obj["box"] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert (rendered.seg[i][rows, cols] == obj["class"]).all()
            assert CLASS_NAMES[obj["class"]] == obj["name"]
            checked += 1
    assert checked > 12


def test_keypoint_visibility_follows_the_instance_map(rendered):
    counts = {0: 0, 1: 0, 2: 0}
    size = SPEC.image_size
    for i, scene in enumerate(rendered.objects):
        for obj in scene["objects"]:
            assert len(obj["keypoints"]) == {"sphere": 5, "box": 5, "pyramid": 4, "ring": 5, "star": 6}[obj["name"]]
            for x, y, visible in obj["keypoints"]:
                counts[visible] += 1
                inside = 0 <= x < size and 0 <= y < size
                assert (visible > 0) == inside
                if inside:
                    assert (rendered.instance[i, int(y), int(x)] == obj["instance"]) == (visible == 2)
    assert counts[2] > counts[1] > 0


def test_load_scenes_writes_once_then_reads_the_cache(tmp_path, monkeypatch):
    first = load_scenes(SPEC, "val", 4, tmp_path)
    folder = tmp_path / SPEC.key() / "val-4"
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{name}.npy" for name in ARRAYS] + ["objects.json"])
    assert json.loads((tmp_path / SPEC.key() / "spec.json").read_text())["seed"] == SPEC.seed

    def fail(*args):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(scenes_module, "render_split", fail)
    second = load_scenes(SPEC, "val", 4, tmp_path)
    np.testing.assert_array_equal(second.normals, first.normals)
    assert second.objects == first.objects


def test_a_corrupt_cache_names_its_folder(tmp_path):
    load_scenes(SPEC, "test", 2, tmp_path)
    (tmp_path / SPEC.key() / "test-2" / "depth.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="test-2"):
        load_scenes(SPEC, "test", 2, tmp_path)


def test_spec_key_changes_with_every_field():
    keys = {SceneSpec().key(), SceneSpec(image_size=48).key(), SceneSpec(seed=1).key(), SceneSpec(noise=0.0).key(),
            SceneSpec(max_objects=3).key(), SceneSpec(min_objects=1).key()}
    assert len(keys) == 6

