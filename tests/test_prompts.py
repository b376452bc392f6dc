import json

import numpy as np
import pytest

from tracker.errors import PromptError
from PIL import Image

from tracker.prompts import (ObjectPrompt, check_prompts, load_prompts, mask_objects, parse_box, parse_xy,
                             prompts_from_json, prompts_from_text, prompts_to_text)
from tracker.render import PALETTE


def test_parse_point_and_box():
    assert parse_xy("320,180") == (320.0, 180.0)
    assert parse_box("1,2,30.5,40") == (1.0, 2.0, 30.5, 40.0)
    for bad in ("320", "a,b", "1,2,3"):
        with pytest.raises(PromptError, match="X,Y"):
            parse_xy(bad)
    with pytest.raises(PromptError, match="X0,Y0,X1,Y1"):
        parse_box("1,2,3")


def test_json_round_trip_and_defaults(tmp_path):
    data = {"objects": [{"id": 1, "frame": 0, "points": [[10, 20]], "labels": [1], "box": None},
                        {"id": 2, "frame": 5, "box": [1, 2, 30, 40]},
                        {"id": 3, "points": [[5, 6], [7, 8]]}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    prompts = load_prompts(path)
    assert prompts[1] == ObjectPrompt(2, 5, [], [], (1.0, 2.0, 30.0, 40.0))
    assert prompts[2].labels == [1, 1] and prompts[2].frame == 0
    assert prompts_from_text(prompts_to_text(prompts)) == prompts


def test_written_prompts_read_back_with_coordinates_to_a_thousandth():
    prompts = [ObjectPrompt(1, 0, [(10.0, 20.5), (1 / 3, 7.0)], [1, 0], None),
               ObjectPrompt(2, 12, [], [], (1.0, 2.25, 30.0, 40.0)), ObjectPrompt(1, 40, [(5.0, 6.0)], [1])]
    text = prompts_to_text(prompts)
    assert text.count("\n") == 5 and '"points": [[10, 20.5], [0.333, 7]]' in text
    again = prompts_from_text(text)
    assert again[1:] == prompts[1:] and again[0].points == [(10.0, 20.5), (0.333, 7.0)]


def test_corrections_are_marked_and_need_a_prompt_that_selects_their_object():
    """A correction applies on the tracked mask: negative points alone take part of it away, and it needs a
    first prompt of its object to be tracked from."""
    prompts = [ObjectPrompt(1, 0, [(10.0, 20.0)]), ObjectPrompt(1, 4, [(12.0, 22.0)], [0], correct=True)]
    text = prompts_to_text(prompts)
    assert text.count('"correct": true') == 1
    again = prompts_from_text(text)
    assert again == prompts and [p.correct for p in again] == [False, True]
    check_prompts(again, 160, 120, 10)
    with pytest.raises(PromptError, match="negative points alone select nothing; add a positive point or a box "
                                          r'\(in a prompts file, "correct": true makes them take part of the '
                                          r"tracked mask away\)"):
        check_prompts([prompts[0], ObjectPrompt(1, 4, [(12.0, 22.0)], [0])], 160, 120, 10)
    with pytest.raises(PromptError, match=r"^object 2 has only corrections \(frame 3\): a correction applies on "
                                          "the object's tracked mask, so give it a prompt that selects it first"):
        check_prompts([prompts[0], ObjectPrompt(2, 3, [(5.0, 5.0)], correct=True)], 160, 120, 10)
    mask = np.zeros((120, 160), bool)
    mask[10:20, 10:20] = True
    with pytest.raises(PromptError, match="its mask on frame 4 is marked as a correction"):
        check_prompts([prompts[0], ObjectPrompt(1, 4, mask=mask, correct=True)], 160, 120, 10)


def test_a_recorded_frame_size_refuses_a_video_of_another_size():
    """Clicks from a smaller video fit a larger one's frame but would land elsewhere; the size recorded with them
    says so. A file without it is taken on any video its points fit."""
    prompts = [ObjectPrompt(1, 0, [(10.0, 20.0)]), ObjectPrompt(2, 3, box=(1, 2, 30, 40))]
    text = prompts_to_text(prompts, (160, 120))
    assert text.startswith('{"frame_size": [160, 120],\n "objects": [\n')
    again = prompts_from_text(text)
    assert again == prompts and [p.frame_size for p in again] == [(160, 120)] * 2
    check_prompts(again, 160, 120, 10)
    with pytest.raises(PromptError, match=r"^the prompts were made on a 160x120 video, and this one is "
                                          r"320x240: the clicks would land elsewhere"):
        check_prompts(again, 320, 240, 10)
    check_prompts(prompts_from_text(prompts_to_text(prompts)), 320, 240, 10)


def test_objects_without_an_id_are_new_objects_with_ids_the_file_leaves_free():
    """A missing id once took the object's position (+1) even where another object had that id: two objects
    then merged into one ("object 2 has two prompts on frame 0")."""
    data = {"objects": [{"id": 2, "points": [[10, 10]]}, {"points": [[20, 20]]}, {"points": [[30, 30]]},
                        {"id": 1, "frame": 4, "points": [[5, 5]]}]}
    assert [prompt.object_id for prompt in prompts_from_json(data)] == [2, 3, 4, 1]
    data = {"objects": [{"points": [[10, 10]]}, {"points": [[20, 20]]}]}
    assert [prompt.object_id for prompt in prompts_from_json(data)] == [1, 2]


POINTS = r'"points" must be a list of \[x, y\] pairs of numbers'


@pytest.mark.parametrize("data, message", [
    ([1, 2], '"objects" list'),
    ({"objects": [{"id": 1, "points": [[1, 2, 3]]}]}, rf"objects\[0\] is malformed: {POINTS}, not \[\[1, 2, 3\]\]"),
    ({"objects": [{"id": 1, "points": "oops"}]}, rf'{POINTS}, not "oops"; see the prompts file format'),
    ({"objects": [{"id": 1, "points": [["a", 2]]}]}, POINTS),
    ({"objects": [{"id": 1, "points": ["12"]}]}, POINTS),
    ({"objects": [{"id": "a", "frame": "x", "points": "oops"}]}, '"id" must be a whole number from 1 to 255, not "a"'),
    ({"objects": [{"id": 1.5, "points": [[1, 2]]}]}, r'"id" must be a whole number from 1 to 255, not 1.5'),
    ({"objects": [{"id": 1, "frame": "x", "points": [[1, 2]]}]}, r'"frame" must be a whole number .*, not "x"'),
    ({"objects": [{"id": 1, "points": [[1, 2]], "labels": [True]}]}, r'"labels" must be a list of 1 \(object\) or 0'),
    ({"objects": [{"id": 1, "box": [1, 2, 3]}]}, r'"box" must be null or \[x0, y0, x1, y1\] \(four numbers\)'),
    ({"objects": [{"id": 1, "pionts": [[1, 2]]}]},
     r"""objects\[0\] in the prompts has unknown keys \['pionts'\] \(a typo\? "pionts" for "points"\); an object's """
     "keys are id, frame, points, labels, box, mask, correct"),
    ({"objects": [{"id": 1, "points": [[1, 2]], "colour": 3}]}, r"unknown keys \['colour'\]; an object's keys"),
    ({"objects": ["x"]}, "must be a JSON object"),
    ({"objects": [{"id": 1, "points": [[1, 2]]}], "frame": 5}, r"unknown keys \['frame'\] beside \"objects\""),
    ({"objects": [{"id": 1, "points": [[1, 2]]}], "frame_size": [640]},
     r'"frame_size" must be null or \[width, height\] \(two whole numbers\), not \[640\]'),
    ({"objects": [{"id": 1, "points": [[1, 2]]}], "frame_size": [640, 0]}, r'"frame_size" must be'),
    ({"objects": [{"id": 1, "points": [[1, 2]], "correct": 1}]}, r'"correct" must be true or false, not 1'),
    ({"objects": [{"points": [[1, 2]], "correct": True}]}, r'objects\[0\] is a correction without an "id"'),
])
def test_malformed_json_is_named(data, message):
    with pytest.raises(PromptError, match=message):
        prompts_from_json(data)


def test_empty_prompts_text_says_so():
    for text in ("", "  \n"):
        with pytest.raises(PromptError, match=r'^prompts file p.json is empty: give JSON such as \{"objects"'):
            prompts_from_text(text, "prompts file p.json")


def test_empty_object_list_says_so():
    with pytest.raises(PromptError, match='no object selected: "objects" in prompts file p.json is empty'):
        prompts_from_text('{"objects": []}', "prompts file p.json")


def test_masks_beside_a_prompts_file(tmp_path):
    """An object's "mask" is a picture beside the prompts file: its id's pixels in a palettised PNG (a frame
    of a masks zip) or a grayscale one of small values (ids saved from numpy), else the bright part of a matte
    or, with transparency, its opaque part (or a bool mask's 1s)."""
    ids = np.zeros((12, 16), np.uint8)
    ids[2:6, 3:9], ids[7:11, 10:15] = 1, 4
    palettised = Image.fromarray(ids, mode="P")
    palettised.putpalette(PALETTE.tobytes())
    palettised.save(tmp_path / "ids.png")
    Image.fromarray(ids).save(tmp_path / "gray_ids.png")
    Image.fromarray((ids == 4).astype(np.uint8) * 230).convert("RGB").save(tmp_path / "matte.jpg", quality=95)
    rgba = np.zeros((12, 16, 4), np.uint8)
    rgba[..., 3] = (ids == 1) * 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "prompts.json"
    path.write_text(json.dumps({"objects": [
        {"id": 4, "frame": 2, "mask": "../ids.png"}, {"id": 1, "mask": str(tmp_path / "gray_ids.png")},
        {"id": 7, "frame": 1, "mask": "../matte.jpg"}, {"frame": 3, "mask": "../alpha.png"},
        {"id": 1, "frame": 5, "points": [[3, 4]]}]}))
    prompts = load_prompts(path)
    assert [(p.object_id, p.frame) for p in prompts] == [(4, 2), (1, 0), (7, 1), (2, 3), (1, 5)]
    expected = [ids == 4, ids == 1, ids == 4, ids == 1, None]
    for prompt, mask in zip(prompts, expected):
        assert (prompt.mask is None) if mask is None else np.array_equal(prompt.mask, mask)
    check_prompts(prompts, width=16, height=12, frame_count=6)
    assert np.array_equal(ObjectPrompt(4, 2, mask=tmp_path / "ids.png").mask, ids == 4)  # a picture's path
    with pytest.raises(PromptError, match="object 4's prompt on frame 2 is a mask"):
        prompts_to_text(prompts)
    assert mask_objects(tmp_path / "ids.png").keys() == {1, 4}
    assert list(mask_objects(tmp_path / "matte.jpg")) == [1]
    # A grayscale picture of 0 and 1 only is a bool mask saved from numpy: the 1s, for any object; palettised, ids.
    Image.fromarray((ids == 4).astype(np.uint8)).save(tmp_path / "bool.png")
    assert np.array_equal(ObjectPrompt(3, 0, mask=tmp_path / "bool.png").mask, ids == 4)
    assert list(mask_objects(tmp_path / "bool.png")) == [1]
    with pytest.raises(PromptError, match=r"ids.png has no pixel of object 3 \(its objects: 1, 4\)"):
        ObjectPrompt(3, 0, mask=tmp_path / "ids.png")

    path.write_text(json.dumps({"objects": [{"id": 2, "mask": "../ids.png"}]}))
    with pytest.raises(PromptError, match=r"ids.png has no pixel of object 2 \(its objects: 1, 4\)"):
        load_prompts(path)
    path.write_text(json.dumps({"objects": [{"id": 2, "mask": "nowhere.png"}]}))
    with pytest.raises(PromptError, match=r"prompts.json names the mask picture nowhere.png \(object 2, frame 0\), "
                                          "which is not beside it$"):
        load_prompts(path)
    path.write_text(json.dumps({"objects": [{"id": 2, "mask": "../ids.png"}]}))
    with pytest.raises(PromptError, match=r'objects\[0\] gives a "mask": masks are pictures beside a prompts file'):
        prompts_from_text(path.read_text())  # text sent to the app's API: no folder to read pictures from
    with pytest.raises(PromptError, match='"mask" must be a picture\'s file name'):
        prompts_from_text('{"objects": [{"id": 1, "mask": 5}]}')
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(PromptError, match="holds no object: every pixel is background"):
        mask_objects(tmp_path / "empty.png")


def test_void_of_a_palettised_mask_is_no_object(tmp_path):
    """255 in a palettised annotation is void (DAVIS and VOC mark unlabelled borders so), not object 255."""
    ids = np.zeros((12, 16), np.uint8)
    ids[2:6, 3:9], ids[7:11, 10:15] = 1, 2
    ids[1, 2:10] = ids[6, 9:16] = 255
    picture = Image.fromarray(ids, mode="P")
    picture.putpalette(PALETTE.tobytes())
    picture.save(tmp_path / "voc.png")
    objects = mask_objects(tmp_path / "voc.png")
    assert objects.keys() == {1, 2}
    assert np.array_equal(objects[1], ids == 1) and np.array_equal(objects[2], ids == 2)
    with pytest.raises(PromptError, match=r"no pixel of object 255 \(its objects: 1, 2\)"):
        ObjectPrompt(255, 0, mask=tmp_path / "voc.png")
    picture.putdata(np.where(ids == 255, 255, 0).astype(np.uint8).ravel())
    picture.save(tmp_path / "void.png")
    with pytest.raises(PromptError, match="holds no object"):
        mask_objects(tmp_path / "void.png")


def test_a_mask_picture_over_pils_size_guard_is_refused_in_one_line(tmp_path, monkeypatch):
    Image.fromarray(np.full((40, 50), 255, np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 2,000 pixels are then over twice the guard
    with pytest.raises(PromptError, match=r"^the mask \S*huge.png is too large a picture \(Image size \(2000 pixels\) "
                                          r"exceeds .*\); a mask has the video's size$"):
        ObjectPrompt(1, 0, mask=tmp_path / "huge.png")


def test_unreadable_prompt_files(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompts(bad)
    with pytest.raises(PromptError, match="cannot be read"):
        load_prompts(tmp_path)
    bad.write_text("[" * 100_000 + "]" * 100_000)  # the JSON parser's recursion ran out
    with pytest.raises(PromptError, match="not valid prompts JSON"):
        load_prompts(bad)


@pytest.mark.parametrize("prompt, message", [
    (ObjectPrompt(1, 0, [(160, 10)], [1]), r"outside the 160x120 frame; x must be in 0..159"),
    (ObjectPrompt(1, 0, [(-1, 10)], [1]), "outside"),
    (ObjectPrompt(1, 30, [(10, 10)], [1]), r"frame 30 is past the end; the video has frames 0..29"),
    (ObjectPrompt(1, -1, [(10, 10)], [1]), r"frame -1 is negative; the video has frames 0..29"),
    (ObjectPrompt(1, 0, [], [], (10, 10, 10, 50)), "zero area"),
    (ObjectPrompt(1, 0, [], [], (10, 10, 200, 50)), "outside"),
    (ObjectPrompt(1, 0, [(10, 10)], [0]), "negative points alone"),
    (ObjectPrompt(1, 0, [], []), "at least one point or a box"),
    (ObjectPrompt(0, 0, [(10, 10)], [1]), "between 1 and 255"),
    (ObjectPrompt(1, 0, [(10, 10)], [2]), "must be 1"),
    (ObjectPrompt(1, 0, [(10, 10), (20, 20)], [1]), "2 points but 1 label$"),
    (ObjectPrompt(1, 0, [], [], (5, 5, float("nan"), 30)), "finite"),
    (ObjectPrompt(1, 0, [(float("nan"), 5)], [1]), "finite"),
    (ObjectPrompt(1, 0, mask=np.ones((60, 80), bool)), "its mask on frame 0 is 80x60, and the video is 160x120"),
    (ObjectPrompt(1, 0, mask=np.zeros((120, 160), bool)), "its mask on frame 0 is empty"),
    (ObjectPrompt(1, 0, [(5, 5)], [1], mask=np.ones((120, 160), bool)), "give its mask or its clicks and box on "
                                                                        "frame 0, not both"),
])
def test_prompt_checks(prompt, message):
    with pytest.raises(PromptError, match=message):
        check_prompts([prompt], width=160, height=120, frame_count=30)


def test_valid_prompts_pass_and_duplicates_fail():
    ok = [ObjectPrompt(1, 0, [(0, 0), (159, 119)], [1, 0]), ObjectPrompt(2, 29, [], [], (0, 0, 160, 120)),
          ObjectPrompt(1, 10, [(5, 5)], [1])]
    check_prompts(ok, 160, 120, 30)
    with pytest.raises(PromptError, match="two prompts on frame 0"):
        check_prompts(ok + [ObjectPrompt(1, 0, [(3, 3)], [1])], 160, 120, 30)
    with pytest.raises(PromptError, match="no object selected"):
        check_prompts([], 160, 120, 30)


@pytest.mark.parametrize("first", [0, 1])
def test_a_prompt_and_a_correction_on_one_frame_say_to_keep_one_not_to_merge(first):
    """Merging them, as the message for two prompts said, makes no sense: the correction applies on the mask the
    prompt gives."""
    entries = [{"id": 1, "points": [[10, 10]]}, {"id": 1, "points": [[12, 12]], "labels": [0], "correct": True}]
    prompts = prompts_from_json({"objects": entries[first:] + entries[:first]})
    with pytest.raises(PromptError, match=r"^object 1 has a prompt and a correction on frame 0: .* keep one"):
        check_prompts(prompts, 160, 120, 30)
    corrections = [ObjectPrompt(1, 0, [(5, 5)], [1]), *[ObjectPrompt(1, 4, [(5, 5)], [0], correct=True)] * 2]
    with pytest.raises(PromptError, match="two prompts on frame 4; merge them"):
        check_prompts(corrections, 160, 120, 30)


def test_points_without_labels_are_on_the_object_and_a_bom_is_no_error(tmp_path):
    assert ObjectPrompt(1, points=[(10, 10), (20, 30)]).labels == [1, 1]
    path = tmp_path / "notepad.json"  # Windows editors start UTF-8 files with a byte-order mark
    path.write_text('\ufeff{"objects": [{"id": 1, "points": [[5, 6]]}]}', encoding="utf-8")
    assert load_prompts(path) == [ObjectPrompt(1, 0, [(5.0, 6.0)], [1])]


def test_a_box_given_by_its_other_two_corners_is_the_same_box():
    assert ObjectPrompt(1, box=(50, 50, 10, 10)).box == (10.0, 10.0, 50.0, 50.0)
    assert ObjectPrompt(1, box=(10, 50, 50, 10)).box == (10.0, 10.0, 50.0, 50.0)


@pytest.mark.parametrize("make, message", [
    (lambda: ObjectPrompt(1, points=[(1, 2, 3)]), r"points must be a list of \(x, y\) pairs of numbers"),
    (lambda: ObjectPrompt(1, points=None), r"points must be a list of \(x, y\) pairs"),
    (lambda: ObjectPrompt(1, points=(1, 2)), r"points must be a list of \(x, y\) pairs"),
    (lambda: ObjectPrompt(1, box=(1, 2, 3)), r"a box is four numbers \(x0, y0, x1, y1\), not \(1, 2, 3\)"),
    (lambda: ObjectPrompt(1, points=[(1, 2)], labels=["a"]), "a point label must be a whole number, not 'a'"),
    (lambda: ObjectPrompt(1, points=[(1, 2)], labels=[1.7]), "a point label must be a whole number, not 1.7"),
    (lambda: ObjectPrompt("1", points=[(1, 2)]), "an object id must be a whole number, not '1'"),
    (lambda: ObjectPrompt(2.5, points=[(1, 2)]), "an object id must be a whole number, not 2.5"),
    (lambda: ObjectPrompt(1, frame=1.5, points=[(1, 2)]), "the prompt frame must be a whole number, not 1.5"),
    (lambda: ObjectPrompt(1, frame="2", points=[(1, 2)]), "the prompt frame must be a whole number, not '2'"),
    (lambda: check_prompts(ObjectPrompt(1, points=[(1, 2)]), 10, 10, 3),
     r"prompts must be a list of ObjectPrompt \(a prompts file's: tracker.load_prompts\(path\)\)"),
])
def test_api_prompts_of_the_wrong_type_are_prompt_errors(make, message):
    """Python callers skip the JSON and argparse checks: a wrong type is named, never a TypeError later."""
    with pytest.raises(PromptError, match=message):
        make()


def test_whole_numbers_of_any_numeric_type_are_taken():
    prompt = ObjectPrompt(np.int64(2), frame=3.0, points=np.array([[1, 2]]), labels=[np.int32(1)])
    assert (prompt.object_id, prompt.frame, prompt.points, prompt.labels) == (2, 3, [(1.0, 2.0)], [1])
    assert type(prompt.object_id) is int and type(prompt.frame) is int


def test_infinite_numbers_in_a_prompts_file_are_named(tmp_path):
    for field, text in (("id", '"id": 1e400'), ("frame", '"frame": -1e400'), ("labels", '"labels": [1e400]')):
        path = tmp_path / "p.json"
        path.write_text('{"objects": [{%s, "points": [[5, 5]]}]}' % text)
        with pytest.raises(PromptError, match=f'objects.0. is malformed: "{field}" must be'):
            load_prompts(path)


def test_a_colour_or_jpeg_or_16_bit_matte_is_a_matte_not_object_ids(tmp_path):
    """Only a lossless grayscale picture holds ids: a colour matte's grey level (red is 76) or a JPEG's ringing
    is not a crowd of objects; a 16-bit matte is bright from half of 16 bits, not from 128 of 65535."""
    matte = np.zeros((12, 16), bool)
    matte[2:8, 3:9] = True
    red = np.zeros((12, 16, 3), np.uint8)
    red[matte] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "red.jpg", quality=90)
    Image.fromarray(red).save(tmp_path / "red.png")
    for name in ("red.jpg", "red.png"):  # nothing half grey or brighter
        with pytest.raises(PromptError, match="holds no object.*half grey or more"):
            mask_objects(tmp_path / name)
    dim = (matte * 100).astype(np.uint8)  # a dim grayscale JPEG: still a matte, and dark
    Image.fromarray(dim).save(tmp_path / "dim.jpg", quality=75)
    with pytest.raises(PromptError, match="holds no object"):
        mask_objects(tmp_path / "dim.jpg")
    for background in (600, 20000):  # 1% and 31% grey in 16 bits: background
        Image.fromarray(np.where(matte, 65535, background).astype(np.uint16)).save(tmp_path / "m16.png")
        objects = mask_objects(tmp_path / "m16.png")
        assert list(objects) == [1] and np.array_equal(objects[1], matte)
    Image.fromarray((matte * 3).astype(np.uint16)).save(tmp_path / "ids16.png")  # 16-bit ids stay ids
    assert list(mask_objects(tmp_path / "ids16.png")) == [3]


def test_ids_saved_as_grey_colour_or_with_opaque_alpha_stay_ids(tmp_path):
    ids = np.zeros((12, 16), np.uint8)
    ids[2:5, 2:5], ids[7:10, 9:14] = 2, 5
    Image.fromarray(np.dstack([ids] * 3)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([ids, np.full_like(ids, 255)]), "LA").save(tmp_path / "la.png")
    for name in ("rgb.png", "la.png"):
        objects = mask_objects(tmp_path / name)
        assert objects.keys() == {2, 5} and np.array_equal(objects[5], ids == 5)
