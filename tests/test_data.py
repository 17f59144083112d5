"""Synthetic world and concept loaders: determinism and bad input."""
import json

import numpy as np
import pytest
import torch

from fastcp.data import synthetic as world
from fastcp.data.concepts import (
    DataError, embedded_sequence, export_embedded_sequence, load_concepts_dir, load_image_folder, load_sequence_file,
)


def test_synthetic_world_is_deterministic():
    a_img, a_cap, a_lab = world.sample_base(16, seed=3)
    b_img, b_cap, b_lab = world.sample_base(16, seed=3)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and np.array_equal(a_lab, b_lab)
    c_img, _, _ = world.sample_base(16, seed=4)
    assert not np.array_equal(a_img, c_img)
    s1, s2 = embedded_sequence(3, seed=1), embedded_sequence(3, seed=1)
    for x, y in zip(s1, s2):
        assert torch.equal(x.train_images, y.train_images) and torch.equal(x.holdout_images, y.holdout_images)


def test_embedded_concepts_are_distinct_and_heldout_differs():
    seq = embedded_sequence(6, seed=0)
    assert len(seq) == 6 and len({c.token for c in seq}) == 6
    for c in seq:
        assert c.train_images.shape == (8, 3, 32, 32)
        assert c.train_images.min() >= -1 and c.train_images.max() <= 1
        assert not torch.equal(c.train_images, c.holdout_images)
        assert c.token in c.prompt and c.class_word in c.prompt
        assert c.prior_prompt == f"a photo of a {c.class_word}"
    assert world.vocabulary() == sorted(set(world.vocabulary()))
    for c in world.PERSONAL_CONCEPTS:
        assert c.shape in world.SHAPES


def test_export_and_reload_sequence(tmp_path):
    seq_file = export_embedded_sequence(tmp_path, num_concepts=2, seed=0)
    loaded = load_sequence_file(seq_file, size=32)
    ref = embedded_sequence(2, seed=0)
    assert [c.name for c in loaded] == [c.name for c in ref]
    assert [c.prompt for c in loaded] == [c.prompt for c in ref]
    # PNG round trip quantises to 8 bits.
    assert torch.allclose(loaded[0].train_images, ref[0].train_images, atol=1 / 127.5 + 1e-6)
    by_dir = load_concepts_dir(tmp_path, size=32)
    assert sorted(c.name for c in by_dir) == sorted(c.name for c in ref)
    assert by_dir[0].holdout_images is not None


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_image_folder(tmp_path / "empty", 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="skipping"):
        with pytest.raises(DataError, match="no readable image"):
            load_image_folder(bad, 32)


def test_sequence_file_errors(tmp_path):
    export_embedded_sequence(tmp_path, num_concepts=2, seed=0)
    data = json.loads((tmp_path / "sequence.json").read_text())
    data["concepts"][1]["token"] = data["concepts"][0]["token"]
    (tmp_path / "dup.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="used by two concepts"):
        load_sequence_file(tmp_path / "dup.json", 32)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot be parsed"):
        load_sequence_file(tmp_path / "broken.json", 32)
    with pytest.raises(DataError, match="does not exist"):
        load_sequence_file(tmp_path / "missing.json", 32)
