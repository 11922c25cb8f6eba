"""Training, evaluating and predicting on a folder of class subfolders and on a TFDS dataset.

The tests marked slow train a tiny model for one epoch (one run per source, shared through module fixtures).
"""

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from nfnet_keras import evaluate, exits, fit, predict, sources
from nfnet_keras.contract import read_class_names
from nfnet_keras.data import DataError

CLASSES = ("circle", "cross", "stripes")
# One colour per class, far apart: the mean colour of an image tells its class.
COLOURS = np.array([[210, 50, 50], [50, 210, 50], [50, 50, 210], [210, 210, 50]], np.float64)
FIT = ["--preset", "tiny", "--epochs", "1", "--batch-size", "8", "--lr", "0.05", "--augment", "translate_flip",
       "--no-export", "--quiet"]


def class_images(label, count, size, seed):
    """`count` uint8 images `size` x `size` of class `label`: its colour plus pixel noise."""
    rng = np.random.default_rng([seed, label])
    images = COLOURS[label] + rng.normal(0.0, 20.0, (count, size, size, 3))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def write_png(path, image):
    tf.io.write_file(str(path), tf.io.encode_png(image))


def write_folder(root, per_class=12, size=40, classes=CLASSES):
    for label, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i, image in enumerate(class_images(label, per_class, size, seed=0)):
            write_png(root / name / f"{i:02d}.png", image)
    return root


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def folder_run(folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "folder"
    assert fit.main([*FIT, "--dataset", f"folder:{folder}", "--run-dir", str(run_dir)]) == exits.OK
    return run_dir


@pytest.mark.slow
def test_a_folder_trains_a_model_of_its_classes_and_image_size(folder_run, folder):
    model_path = str(folder_run / "model.keras")
    model = keras.saving.load_model(model_path, compile=False)
    assert model.input_shape == (None, 40, 40, 3) and model.output_shape == (None, 3)
    assert read_class_names(model_path) == CLASSES
    with open(folder_run / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["class_names"] == list(CLASSES)
    # No train/ and test/ inside: a fifth of each class's 12 images (2) is the test split.
    assert metrics["test_images"] == 6
    assert metrics["config"]["dataset"] == f"folder:{folder}"


def test_the_split_of_a_folder_without_train_and_test_is_a_fixed_fifth_of_each_class():
    labels = np.repeat(np.arange(3), [12, 10, 4])
    train, test = sources.holdout_split(labels)
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 2, 0]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(26))
    np.testing.assert_array_equal(sources.holdout_split(labels)[1], test)  # the same every time


def test_the_validation_split_of_other_data_is_at_most_a_tenth_of_its_training_images():
    assert sources.val_size_for("folder:x", 5000, 1000) == (
        100, "Holding out 100 of the 1000 training images for validation (--val-size 5000 is at most a tenth of them).")
    assert sources.val_size_for("tfds:x", 50, 1000) == (50, "")
    assert sources.val_size_for("cifar10", 5000, 1000) == (5000, "")  # CIFAR-10's --val-size is as given


@pytest.mark.slow
def test_predict_names_the_folder_classes_and_resizes_to_the_model(folder_run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for label in range(3):  # 64 x 64 files: resized to the model's 40 x 40
        write_png(images / f"{CLASSES[label]}.png", class_images(label, 1, 64, seed=7)[0])
    out = tmp_path / "out.csv"
    assert predict.main(["--model", str(folder_run / "model.keras"), "--images", str(images),
                         "--out", str(out)]) == exits.OK
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["circle.png", "cross.png", "stripes.png"]
    assert {r["class"] for r in rows} <= set(CLASSES)
    probabilities = tmp_path / "p.npy"
    assert predict.main(["--model", str(folder_run / "model.keras"), "--images", str(images),
                         "--out", str(probabilities)]) == exits.OK
    p = np.load(probabilities)
    assert p.shape == (3, 3)
    assert [CLASSES[i] for i in p.argmax(1)] == [r["class"] for r in rows]


@pytest.mark.slow
def test_predict_refuses_an_array_of_another_size_than_the_model(folder_run, tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 32, 32, 3), np.uint8))
    assert predict.main(["--model", str(folder_run / "model.keras"), "--images", str(path),
                         "--out", str(tmp_path / "o.csv")]) == exits.BAD_INPUT
    assert one_line_error(capsys) == f"error: {path}: expected shape N x 40 x 40 x 3, got (2, 32, 32, 3)."
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.slow
def test_evaluate_reports_the_folder_test_split_with_its_class_names(folder_run, folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(folder_run / "model.keras"), "--dataset", f"folder:{folder}",
                          "--json", str(out)]) == exits.OK
    printed = capsys.readouterr().out
    for name in CLASSES:
        assert f"\n{name:>10}  " in printed
    with open(out) as f:
        result = json.load(f)
    assert result["images"] == 6 and np.asarray(result["confusion_matrix"]).shape == (3, 3)
    with open(folder_run / "metrics.json") as f:
        assert result["test_accuracy"] == pytest.approx(json.load(f)["test_accuracy"])


@pytest.mark.slow
def test_evaluate_refuses_data_with_other_classes(folder_run, tmp_path, capsys):
    other = write_folder(tmp_path / "four", per_class=5, classes=("a", "b", "c", "d"))
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(folder_run / "model.keras"), "--dataset", f"folder:{other}",
                          "--json", str(out)]) == exits.BAD_INPUT
    assert one_line_error(capsys) == (
        f"error: --model {folder_run / 'model.keras'} classifies 3 classes (circle, cross, stripes) but --dataset "
        f"folder:{other} has 4 (a, b, c, d); evaluate a model on data with its classes.")
    assert not out.exists()


@pytest.mark.slow
def test_the_savedmodel_takes_the_model_image_size_and_carries_its_class_names(folder_run, tmp_path):
    from nfnet_keras import export

    model_path = str(folder_run / "model.keras")
    assert export.main(["--model", model_path, "--name", "shapes", "--base-dir", str(tmp_path)]) == exits.OK
    version = tmp_path / "shapes" / "1"
    assert (version / "assets" / "class_names.txt").read_text() == "circle\ncross\nstripes\n"
    images = tmp_path / "x.npy"
    np.save(images, np.concatenate([class_images(label, 2, 40, seed=3) for label in range(3)]))
    rows = {}
    for source in (model_path, str(version)):
        out = tmp_path / f"{len(rows)}.csv"
        assert predict.main(["--model", source, "--images", str(images), "--out", str(out)]) == exits.OK
        with open(out) as f:
            rows[source] = list(csv.DictReader(f))
    assert [r["class"] for r in rows[model_path]] == [r["class"] for r in rows[str(version)]]
    np.testing.assert_allclose([float(r["probability"]) for r in rows[model_path]],
                               [float(r["probability"]) for r in rows[str(version)]], atol=1e-4)


def _bad_folders(root):
    """name -> (the folder, the error after `error: --dataset folder:<folder>`)."""
    cases = {}
    cases["missing"] = (root / "missing", ": no such folder; give a folder with one subfolder of images per class.")
    one = write_folder(root / "one", per_class=3, classes=("only",))
    cases["one class"] = (one, " has one class subfolder (only); a classifier needs at least 2 classes.")
    empty = write_folder(root / "empty", per_class=3, classes=("a", "b"))
    os.makedirs(empty / "c")
    cases["empty class"] = (empty, f": class folder {empty / 'c'} holds no images (bmp/gif/jpeg/jpg/png); add some or "
                                   "remove the folder.")
    none = root / "none"
    for name in ("a", "b"):
        os.makedirs(none / name)
        (none / name / "notes.txt").write_text("not an image")
    cases["no images"] = (none, " holds no images (bmp/gif/jpeg/jpg/png) in its class subfolders; add images there.")
    flat = root / "flat"
    flat.mkdir()
    write_png(flat / "x.png", class_images(0, 1, 8, 0)[0])
    cases["no subfolders"] = (flat, f" has no class subfolders; put each class's images in its own subfolder "
                                    f"({flat / '<class>' / 'image.png'}).")
    return cases


@pytest.mark.parametrize("case", ["missing", "one class", "empty class", "no images", "no subfolders"])
def test_a_bad_folder_is_refused_in_one_line_before_anything_is_written(case, tmp_path, capsys):
    folder, message = _bad_folders(tmp_path / "data")[case]
    run_dir = tmp_path / "run"
    assert fit.main([*FIT, "--dataset", f"folder:{folder}", "--run-dir", str(run_dir)]) == exits.BAD_INPUT
    assert one_line_error(capsys) == f"error: --dataset folder:{folder}{message}"
    assert not run_dir.exists()


def test_an_unreadable_image_is_named(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", per_class=5, classes=("a", "b"))
    bad = folder / "b" / "03.png"
    bad.write_bytes(b"\x89PNG truncated")
    run_dir = tmp_path / "run"
    assert fit.main([*FIT, "--dataset", f"folder:{folder}", "--run-dir", str(run_dir)]) == exits.BAD_INPUT
    error = one_line_error(capsys)
    assert error.startswith(f"error: {bad} is not a readable image (") and error.endswith("); remove or replace it.")
    assert not run_dir.exists()


def test_images_of_different_sizes_need_image_size(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", per_class=5, size=24, classes=("a", "b"))
    write_png(folder / "b" / "99.png", class_images(1, 1, 30, 0)[0][:, :20])  # 20 wide, 30 high
    with pytest.raises(DataError, match=r"^--dataset folder:.*: images differ in size \(24x24 in .*00.png, 20x30 in "
                                        r".*99.png\); pass --image-size N to resize them all to N x N\.$"):
        sources.load_dataset(f"folder:{folder}")
    data = sources.load_dataset(f"folder:{folder}", image_size=16)
    assert data.image_shape == (16, 16, 3) and data.train[0].dtype == np.uint8
    assert data.class_names == ("a", "b") and len(data.train[0]) + len(data.test[0]) == 11


def test_train_and_test_subfolders_are_the_splits(tmp_path):
    root = tmp_path / "data"
    write_folder(root / "train", per_class=4, size=16, classes=("x", "y"))
    write_folder(root / "test", per_class=2, size=16, classes=("x", "y"))
    data = sources.load_dataset(f"folder:{root}")
    assert data.note == "" and data.class_names == ("x", "y")
    assert data.train[1].tolist() == [0] * 4 + [1] * 4 and data.test[1].tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(data.test[0][0], class_images(0, 2, 16, seed=0)[0])
    write_folder(root / "test", per_class=1, size=16, classes=("z",))
    with pytest.raises(DataError, match=r"test/ has classes x, y, z but train/ has x, y; give both the same class"):
        sources.load_dataset(f"folder:{root}")


def test_a_bad_dataset_value_is_refused_by_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit.parse_config(["--dataset", "imagenet"])
    assert exit_info.value.code == exits.BAD_INPUT
    assert "--dataset must be cifar10, folder:PATH or tfds:NAME, got 'imagenet'." in capsys.readouterr().err


# === TFDS ===

TFDS_NAME = "nfnet_test_shapes"


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A TFDS data_dir holding `nfnet_test_shapes`: 24 x 24 images of the 3 classes, train (30) and test (9)."""
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(24, 24, 3)),
                                           "label": tfds.features.ClassLabel(names=list(CLASSES))})

    def split(per_class, seed):
        images = np.concatenate([class_images(label, per_class, 24, seed) for label in range(3)])
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": np.repeat(np.arange(3), per_class)})

    tfds.dataset_builders.store_as_tfds_dataset(TFDS_NAME, "1.0.0", features, {"train": split(10, 1),
                                                                               "test": split(3, 2)},
                                                data_dir=data_dir)
    return data_dir


@pytest.mark.slow
def test_a_tfds_dataset_trains_and_evaluates(tfds_dir, tmp_path, capsys):
    data = sources.load_dataset(f"tfds:{TFDS_NAME}", tfds_dir=tfds_dir)
    assert data.class_names == CLASSES and data.image_shape == (24, 24, 3)
    np.testing.assert_array_equal(np.sort(data.test[1]), np.repeat(np.arange(3), 3))
    run_dir = tmp_path / "run"
    assert fit.main([*FIT, "--dataset", f"tfds:{TFDS_NAME}", "--tfds-dir", tfds_dir, "--image-size", "32",
                     "--run-dir", str(run_dir)]) == exits.OK
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 3)
    assert read_class_names(str(run_dir / "model.keras")) == CLASSES
    capsys.readouterr()
    assert evaluate.main(["--model", str(run_dir / "model.keras"), "--dataset", f"tfds:{TFDS_NAME}",
                          "--tfds-dir", tfds_dir]) == exits.OK
    assert "test accuracy: " in capsys.readouterr().out


@pytest.mark.parametrize("name, message", [
    ("no_such_dataset_xyz", "error: --dataset tfds:no_such_dataset_xyz: no TFDS dataset of that name, registered or "
                            "prepared in {dir}; check the name or --tfds-dir."),
    ("mnist", "error: --dataset tfds:mnist is not prepared in {dir} (nothing is downloaded here); prepare it on a "
              "connected machine (tfds build mnist --data_dir DIR), copy DIR here and pass --tfds-dir DIR."),
])
def test_an_unknown_or_unprepared_tfds_dataset_is_refused(name, message, tfds_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert fit.main([*FIT, "--dataset", f"tfds:{name}", "--tfds-dir", tfds_dir, "--run-dir", str(run_dir)]) == \
        exits.BAD_INPUT
    assert one_line_error(capsys) == message.format(dir=tfds_dir)
    assert not run_dir.exists()


# === Augmentation at other sizes ===


@pytest.mark.parametrize("policy, size, pad", [("translate_flip", 32, 2), ("translate_flip", 64, 4),
                                                ("standard", 40, 5), ("standard", 16, 2), ("noise_rotate_flip", 64, 0)])
def test_shifts_scale_with_the_image_size(policy, size, pad):
    from nfnet_keras import data

    assert data.shift_for(policy, (size, size, 3))[0] == pad


def test_translate_flip_moves_64_pixel_images_by_up_to_4_pixels():
    from nfnet_keras import data

    images = np.random.default_rng(0).normal(size=(32, 64, 64, 3)).astype("float32")
    out = data.make_augmenter("translate_flip", seed=3)(images).numpy()
    shifts = []
    for x, y in zip(images, out):
        found = [(dy, dx) for v in (x, x[:, ::-1]) for dy in range(-4, 5) for dx in range(-4, 5)
                 if np.array_equal(np.roll(v, (dy, dx), (0, 1))[4:-4, 4:-4], y[4:-4, 4:-4])]
        assert len(found) == 1
        shifts.append(max(abs(found[0][0]), abs(found[0][1])))
    assert max(shifts) == 4
