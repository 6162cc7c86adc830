"""The MVTec AD layout reader, on the real shared data and on small layouts built in tmp_path."""

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer.dataset import (
    DatasetLayoutError,
    Sample,
    list_categories,
    load_image,
    load_mask,
    scan,
    split_holdout,
)

# Counts from the data README (shared/data/README.md).
EXPECTED_TEST_TYPES = {
    "magnetic_tile": {"good": 190, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103},
    "metal_plate": {"good": 26, "defect": 71},
}
EXPECTED_TRAIN = {"magnetic_tile": 762, "metal_plate": 54}
EMPTY_SOURCE_MASKS = {"exp3_num_45042", "exp4_num_124690", "exp4_num_352527", "exp4_num_45057"}


@pytest.fixture(scope="module")
def real_train(shared_data):
    return scan(shared_data, None, "train")


@pytest.fixture(scope="module")
def real_test(shared_data):
    return scan(shared_data, None, "test")


def write_png(path: Path, shape=(6, 8), value=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full(shape, value, dtype=np.uint8))
    return path


def make_layout(root: Path, category="widget", defects=("scratch",), n_train=3) -> Path:
    """A tiny valid layout: train/good, test/good, test/<defect> with masks."""
    base = root / category
    for i in range(n_train):
        write_png(base / "train" / "good" / f"{i:03d}.png")
    write_png(base / "test" / "good" / "000.png")
    for defect in defects:
        write_png(base / "test" / defect / "000.png")
        write_png(base / "ground_truth" / defect / "000_mask.png", value=255)
    return root


def train_samples(category: str, n: int) -> list[Sample]:
    return [Sample(Path(f"/d/{category}/train/good/{i:03d}.png"), category, "train", "good", 0, None) for i in range(n)]


# --- the real data ---------------------------------------------------------------------------


def test_list_categories_finds_both_categories_when_reading_shared_data(shared_data):
    assert list_categories(shared_data) == ["magnetic_tile", "metal_plate"]


def test_scan_counts_match_readme_when_reading_train_split(real_train):
    assert Counter(s.category for s in real_train) == EXPECTED_TRAIN
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in real_train)


def test_scan_counts_match_readme_when_reading_test_split(real_test):
    for category, expected in EXPECTED_TEST_TYPES.items():
        found = Counter(s.defect_type for s in real_test if s.category == category)
        assert found == expected, category
    assert sum(s.label for s in real_test if s.category == "magnetic_tile") == 392
    assert sum(s.label for s in real_test if s.category == "metal_plate") == 71


def test_scan_gives_every_defective_sample_an_existing_mask_when_reading_test_split(real_test):
    for sample in real_test:
        if sample.label == 1:
            assert sample.mask_path is not None and sample.mask_path.is_file(), sample.path
            assert sample.mask_path.name == f"{sample.path.stem}_mask.png"
            assert sample.mask_path.parent.name == sample.defect_type
        else:
            assert sample.defect_type == "good" and sample.mask_path is None


def test_scan_returns_sorted_deterministic_order_when_called_twice(shared_data, real_test):
    assert scan(shared_data, ["metal_plate", "magnetic_tile"], "test") == real_test
    keys = [(s.category, s.defect_type, s.path.name) for s in real_test]
    assert keys == sorted(keys)


def test_load_image_returns_rgb_uint8_when_file_is_grayscale(real_train):
    path = next(s.path for s in real_train if s.category == "magnetic_tile")
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 2  # the file really is grayscale
    image = load_image(path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])


def test_load_mask_matches_image_size_when_sample_is_defective(real_test):
    sample = next(s for s in real_test if s.category == "magnetic_tile" and s.defect_type == "crack")
    image = load_image(sample.path)
    mask = load_mask(sample, image.shape[:2])
    assert mask.dtype == bool and mask.shape == image.shape[:2]
    assert 0 < mask.sum() < mask.size


def test_load_mask_is_all_false_when_source_mask_was_empty(real_test):
    sample = next(s for s in real_test if s.path.stem in EMPTY_SOURCE_MASKS)
    assert sample.label == 1
    image = load_image(sample.path)
    assert not load_mask(sample, image.shape[:2]).any()


# --- layouts built in tmp_path -------------------------------------------------------------


def test_scan_lists_good_and_defective_when_layout_is_valid(tmp_path):
    make_layout(tmp_path)
    test = scan(tmp_path, ["widget"], "test")
    assert [(s.defect_type, s.label) for s in test] == [("good", 0), ("scratch", 1)]
    assert test[1].mask_path == tmp_path / "widget" / "ground_truth" / "scratch" / "000_mask.png"
    assert len(scan(tmp_path, None, "train")) == 3


def test_scan_names_expected_mask_when_mask_is_missing(tmp_path):
    make_layout(tmp_path)
    write_png(tmp_path / "widget" / "test" / "scratch" / "001.png")
    expected = tmp_path / "widget" / "ground_truth" / "scratch" / "001_mask.png"
    with pytest.raises(DatasetLayoutError, match="have no mask") as error:
        scan(tmp_path, None, "test")
    assert str(expected) in str(error.value)


def test_scan_lists_existing_categories_when_category_is_missing(tmp_path):
    make_layout(tmp_path, "widget")
    make_layout(tmp_path, "bolt")
    with pytest.raises(DatasetLayoutError, match="category 'gear' not found") as error:
        scan(tmp_path, ["gear"], "train")
    assert "bolt, widget" in str(error.value)


def test_scan_names_train_good_when_category_lacks_it(tmp_path):
    write_png(tmp_path / "widget" / "test" / "good" / "000.png")
    with pytest.raises(DatasetLayoutError, match="no train/good folder") as error:
        scan(tmp_path, ["widget"], "test")
    assert str(tmp_path / "widget" / "train" / "good") in str(error.value)


def test_scan_raises_when_root_is_missing(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        scan(tmp_path / "nowhere", None, "train")


def test_scan_raises_when_root_has_no_category(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(DatasetLayoutError, match="no category found.*notes"):
        scan(tmp_path, None, "train")


def test_scan_raises_when_split_has_no_images(tmp_path):
    (tmp_path / "widget" / "train" / "good").mkdir(parents=True)
    (tmp_path / "widget" / "train" / "good" / "readme.txt").write_text("not an image")
    with pytest.raises(DatasetLayoutError, match="'train' of category 'widget' is empty"):
        scan(tmp_path, None, "train")


def test_scan_raises_when_split_name_is_unknown(tmp_path):
    make_layout(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        scan(tmp_path, None, "validation")


def test_load_image_names_file_when_it_is_not_an_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not a png")
    with pytest.raises(DatasetLayoutError, match="broken.png"):
        load_image(path)


def test_load_mask_raises_when_mask_size_differs_from_image(tmp_path):
    make_layout(tmp_path)
    sample = scan(tmp_path, None, "test")[1]
    with pytest.raises(DatasetLayoutError, match="6x8.*7x8"):
        load_mask(sample, (7, 8))


def test_load_mask_is_all_false_when_sample_is_good(tmp_path):
    make_layout(tmp_path)
    good = scan(tmp_path, None, "test")[0]
    mask = load_mask(good, (6, 8))
    assert mask.dtype == bool and mask.shape == (6, 8) and not mask.any()


# --- split_holdout -----------------------------------------------------------------------------


def test_split_holdout_is_deterministic_and_disjoint_when_called_twice():
    samples = train_samples("a", 50) + train_samples("b", 7)
    fit, holdout = split_holdout(samples, 0.2, seed=3)
    assert split_holdout(samples, 0.2, seed=3) == (fit, holdout)
    assert not {s.path for s in fit} & {s.path for s in holdout}
    assert sorted(fit + holdout, key=lambda s: s.path) == sorted(samples, key=lambda s: s.path)
    assert Counter(s.category for s in holdout) == {"a": 10, "b": 1}
    assert fit == [s for s in samples if s in fit]  # input order kept


def test_split_holdout_changes_selection_when_seed_changes():
    samples = train_samples("a", 50)
    assert split_holdout(samples, 0.2, seed=0)[1] != split_holdout(samples, 0.2, seed=1)[1]


def test_split_holdout_keeps_one_on_each_side_when_category_is_tiny():
    fit, holdout = split_holdout(train_samples("a", 2) + train_samples("b", 1), 0.01)
    assert Counter(s.category for s in fit) == {"a": 1, "b": 1}
    assert Counter(s.category for s in holdout) == {"a": 1}
    fit, holdout = split_holdout(train_samples("a", 2), 0.99)
    assert len(fit) == 1 and len(holdout) == 1


def test_split_holdout_keeps_a_category_split_when_another_category_is_added():
    alone = split_holdout(train_samples("a", 30), 0.3, seed=5)[1]
    together = split_holdout(train_samples("a", 30) + train_samples("b", 30), 0.3, seed=5)[1]
    assert [s for s in together if s.category == "a"] == alone


def test_split_holdout_raises_when_given_test_samples():
    test_sample = Sample(Path("/d/a/test/crack/000.png"), "a", "test", "crack", 1, Path("/d/m.png"))
    with pytest.raises(ValueError, match="only train/good"):
        split_holdout(train_samples("a", 5) + [test_sample], 0.2)


def test_split_holdout_raises_when_fraction_is_out_of_range():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_holdout(train_samples("a", 5), 1.0)
