"""Data folders a user may have: 16-bit images, symbolic-link loops and duplicates, test class folders that are
not the training ones, and evaluations of one run on several data sets (each keeps its own record)."""
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import data.datasets as datasets
from data.datasets import load_split, read_image
from engine.records import record_path
from main import main
from tests.conftest import TINY
from tests.test_reliability import _snapshot

FOLDER = [a for a in TINY if not a.startswith(("--dataset_name", "--image_size", "--batch_size", "--limit"))] + [
    "--dataset_name=folder", "--batch_size=4", "--limit_train_batches=1", "--epochs=1", "--clr=simclr"]
EVAL = ["--train_mode=eval", "--no-tsne", "--workers=0", "--device=cpu"]
SIXTEEN = "is a 16-bit image; its values are scaled to 8 bits"


@pytest.fixture(autouse=True)
def _new_run():
    """Each main() here is a run of its own: the once-a-run warnings start afresh."""
    datasets.reset_run_warnings()


def _folder(root, classes=("a", "b"), train=4, test=2, sixteen=()):
    """Tiny 8x8 PNGs under root/{train,test}/<class>/; the (split, class) pairs in ``sixteen`` are 16-bit
    grayscale PNGs. Returns the root."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for k, c in enumerate(classes):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                if (split, c) in sixteen:
                    Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(root / split / c / f"{i}.png")
                else:
                    Image.new("RGB", (8, 8), (40 * i, 60 * k, 0)).save(root / split / c / f"{i}.png")
    return root


def _err_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


def _baseline(data, tmp_path, *extra):
    """A random-init kNN evaluation of the folder ``data`` (quick: no pretraining)."""
    return main(EVAL + ["--transfer_mode=knn", "--checkpoint_dir=none", "--dataset_name=folder", f"--data={data}",
                        "--arch=resnet18", f"--results_dir={tmp_path / 'results'}", *extra])


# ----------------------------------------------------------------------------- 16-bit images
@pytest.mark.parametrize("name, values", [("x.png", "uint16"), ("x.tif", "uint16"), ("x.tif", "int32")])
def test_a_16_bit_image_is_scaled_to_8_bits_with_one_warning(tmp_path, capsys, name, values):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 65536, (5, 7)).astype(values)
    pixels[0, :4] = [0, 128, 129, 65535]  # the ends, and both sides of the first rounding step (128.5)
    for i in range(3):
        Image.fromarray(pixels).save(tmp_path / f"{i}{name}")
    with Image.open(tmp_path / f"0{name}") as img:
        assert img.mode in ("I;16", "I")  # the modes PIL's conversion clipped to white
    expected = np.floor(pixels.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # round half up, in float64
    for i in range(3):
        got = np.asarray(read_image(str(tmp_path / f"{i}{name}")))
        assert got.shape == (5, 7, 3) and got.dtype == np.uint8
        assert (got == expected[..., None]).all()
    assert list(expected[0, :4]) == [0, 0, 1, 255]
    assert _err_lines(capsys) == [f"warning: {tmp_path / f'0{name}'} {SIXTEEN}"]  # once, not once an image


def test_16_bit_training_images_train_with_one_warning(tmp_path, capsys):
    data = _folder(tmp_path / "data", sixteen={("train", "a"), ("train", "b")})
    assert main(FOLDER + [f"--data={data}", f"--log_dir={tmp_path / 'run'}", "--limit_train_batches=2"]) == 0
    (line,) = _err_lines(capsys)
    sixteen = {f"warning: {data / 'train' / c / f'{i}.png'} {SIXTEEN}" for c in "ab" for i in range(4)}
    assert line in sixteen  # the first one read, whichever the shuffle drew


def test_16_bit_images_in_the_device_resident_copy_are_their_8_bit_values(tmp_path, capsys):
    from data.loaders import resident_images

    data = _folder(tmp_path / "data", sixteen={("train", "b")})
    split = load_split("folder", str(data), train=True)
    images = resident_images(split, "folder")  # --faster_version's copy of the dataset
    for (path, _), image in zip(split.dataset.samples, images):
        with Image.open(path) as img:
            values = np.asarray(img).astype(np.float64)
        if values.ndim == 2:  # the 16-bit ones, independently scaled
            values = np.repeat(np.floor(values / 257 + 0.5)[..., None], 3, axis=2)
        assert (image.permute(1, 2, 0).numpy() == values).all(), path
    assert _err_lines(capsys) == [f"warning: {data / 'train' / 'b' / '0.png'} {SIXTEEN}"]
    datasets.reset_run_warnings()  # what follows is a run of its own
    assert main(FOLDER + [f"--data={data}", f"--log_dir={tmp_path / 'run'}", "--faster_version"]) == 0
    assert _err_lines(capsys) == [f"warning: {data / 'train' / 'b' / '0.png'} {SIXTEEN}"]


@pytest.mark.parametrize("workers", [0, 2])
def test_16_bit_test_images_evaluate_with_one_warning_whatever_the_workers(tmp_path, capfd, workers):
    data = _folder(tmp_path / "data", sixteen={("test", "a"), ("test", "b"), ("train", "a")})
    assert _baseline(data, tmp_path, f"--workers={workers}") == 0
    # test features come first, in order: the first 16-bit file read is the first test image; the workers of the
    # train features' loader, forked later, share the flag with the first loader's: one line in all
    assert _err_lines(capfd) == [f"warning: {data / 'test' / 'a' / '0.png'} {SIXTEEN}"]  # capfd: workers' too
    (record,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "results") for f in fs if f.endswith(".json")]
    assert json.load(open(record))["test_images"] == 4


# ----------------------------------------------------------------------------- symbolic links
@pytest.mark.parametrize("target, back_into", [
    ("..", "train"),  # to the parent: the split's folder, which holds every class
    (".", "train/a"),  # to itself
    ("../..", "REAL"),  # to the data root, which holds train/
    ("/", "/"),  # to the file system's root
])
def test_a_symlink_loop_in_a_class_folder_is_one_line_and_changes_nothing(tmp_path, capsys, target, back_into):
    data = _folder(tmp_path / "data")
    os.symlink(target, data / "train" / "a" / "loop")
    leads_to = {"REAL": os.path.realpath(data), "/": "/"}.get(back_into, str(data / back_into))
    before = _snapshot(tmp_path)
    assert main(FOLDER + [f"--data={data}", f"--results_dir={tmp_path / 'results'}"]) == 2
    assert _err_lines(capsys) == [f"error: {data / 'train' / 'a' / 'loop'} is a symbolic link back into {leads_to} "
                                  "(a loop); remove it, or point it outside that folder"]
    assert _snapshot(tmp_path) == before and not (tmp_path / "results").exists()


def test_a_loop_deeper_down_or_in_the_test_split_is_refused_too(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    (data / "test" / "b" / "x" / "y").mkdir(parents=True)
    os.symlink("../..", data / "test" / "b" / "x" / "y" / "up")  # to test/b
    before = _snapshot(tmp_path)
    assert _baseline(data, tmp_path) == 2
    assert _err_lines(capsys) == [f"error: {data / 'test' / 'b' / 'x' / 'y' / 'up'} is a symbolic link back into "
                                  f"{data / 'test' / 'b'} (a loop); remove it, or point it outside that folder"]
    assert _snapshot(tmp_path) == before and not (tmp_path / "results").exists()


def test_two_class_folders_that_are_one_directory_are_refused(tmp_path, capsys):
    data = _folder(tmp_path / "data", classes=("a",))
    os.symlink("a", data / "train" / "b")
    os.symlink("a", data / "test" / "b")
    before = _snapshot(tmp_path)
    assert main(FOLDER + [f"--data={data}", f"--results_dir={tmp_path / 'results'}"]) == 2
    assert _err_lines(capsys) == [f"error: {data / 'train' / 'b'} and {data / 'train' / 'a'} are the same folder "
                                  "(through a symbolic link), in classes a and b; an image must belong to one class: "
                                  "remove the link"]
    assert _snapshot(tmp_path) == before and not (tmp_path / "results").exists()


def test_an_image_linked_into_another_class_is_refused(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    os.symlink(data / "train" / "a" / "1.png", data / "train" / "b" / "9.png")
    with pytest.raises(datasets.UserError) as caught:
        load_split("folder", str(data), train=True)
    assert str(caught.value) == (f"{data / 'train' / 'b' / '9.png'} and {data / 'train' / 'a' / '1.png'} are the same "
                                 "image (through a symbolic link), in classes a and b; an image must belong to one "
                                 "class: remove the link")


def test_an_image_reached_twice_within_its_class_counts_once_with_one_warning(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    (data / "train" / "a" / "more").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (0, 0, 50 * i)).save(data / "train" / "a" / "more" / f"{i}.png")
    os.symlink("more", data / "train" / "a" / "again")  # the 3 images a second time
    os.symlink("0.png", data / "train" / "b" / "copy.png")  # one image a second time
    split = load_split("folder", str(data), train=True)
    paths = [p for p, _ in split.dataset.samples]
    assert len(paths) == 4 + 3 + 4 == len({os.path.realpath(p) for p in paths})
    warning = (f"warning: {data / 'train' / 'a' / 'again'} is {data / 'train' / 'a' / 'more'} again (through a "
               f"symbolic link); it is counted once, as are 1 more such repeat(s) under {data / 'train'}")
    assert _err_lines(capsys) == [warning]
    datasets.reset_run_warnings()  # what follows is a run of its own, whose kNN monitor loads the split again
    assert main(FOLDER + [f"--data={data}", f"--log_dir={tmp_path / 'run'}", "--eval_every_n_epochs=1"]) == 0
    assert _err_lines(capsys) == [warning]


def test_folders_linked_from_elsewhere_and_plain_trees_keep_torchvisions_samples(tmp_path, capsys):
    from torchvision.datasets import ImageFolder

    data = _folder(tmp_path / "data")
    elsewhere = _folder(tmp_path / "elsewhere", classes=("c", "d"))
    os.symlink(elsewhere / "train" / "c", data / "train" / "c")  # a class kept in another place
    os.symlink(elsewhere / "train" / "d", data / "train" / "a" / "x-more")  # a subfolder kept in another place
    for sub in ("x", "x/y", "X"):
        (data / "train" / "a" / sub).mkdir()
        Image.new("RGB", (8, 8)).save(data / "train" / "a" / sub / "z.png")
    (data / "train" / "b" / "notes.txt").write_text("not an image")
    ours = load_split("folder", str(data), train=True).dataset
    assert ours.samples == ImageFolder(str(data / "train")).samples and len(ours.samples) == 4 + 4 + 4 + 3 + 4
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- test classes = training classes
@pytest.mark.parametrize("change, only_train, only_test", [
    (lambda test: os.rename(test / "b", test / "c"), "b", "c"),  # a renamed class folder
    (lambda test: shutil.copytree(test / "b", test / "d"), "none", "d"),  # an extra one
    (lambda test: shutil.rmtree(test / "a"), "a", "none"),  # a missing one
])
def test_test_class_folders_must_be_the_training_ones(tmp_path, capsys, change, only_train, only_test):
    data = _folder(tmp_path / "data")
    change(data / "test")
    before = _snapshot(tmp_path)
    assert _baseline(data, tmp_path) == 2
    assert _err_lines(capsys) == [
        f"error: the class folders of {data / 'test'} are not those of {data / 'train'}: only in train: {only_train}; "
        f"only in test: {only_test}; name the test folders as the training ones (a label is a folder name's place "
        "among the sorted names)"]
    assert _snapshot(tmp_path) == before and not (tmp_path / "results").exists()


def test_a_long_list_of_mismatched_classes_stays_one_short_line(tmp_path, capsys):
    data = _folder(tmp_path / "data", classes=[f"c{i:02d}" for i in range(12)], train=1, test=1)
    for i in range(12):
        os.rename(data / "test" / f"c{i:02d}", data / "test" / f"t{i:02d}")
    assert _baseline(data, tmp_path) == 2
    (line,) = _err_lines(capsys)
    assert ("only in train: c00, c01, c02, c03, c04 and 7 more; only in test: t00, t01, t02, t03, t04 and 7 more;"
            in line)


def test_pretrainings_knn_monitor_checks_the_test_classes_and_leaves_no_run(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    os.rename(data / "test" / "b", data / "test" / "B")
    for existed in (False, True):  # --results_dir made by the refused run goes too; one that existed stays
        if existed:
            (tmp_path / "results").mkdir()
        before = _snapshot(tmp_path)
        assert main(FOLDER + [f"--data={data}", f"--results_dir={tmp_path / 'results'}",
                              "--eval_every_n_epochs=1"]) == 2
        assert _err_lines(capsys) == [
            f"error: the class folders of {data / 'test'} are not those of {data / 'train'}: only in train: b; "
            "only in test: B; name the test folders as the training ones (a label is a folder name's place among "
            "the sorted names)"]
        assert _snapshot(tmp_path) == before and (tmp_path / "results").exists() == existed


# ----------------------------------------------------------------------------- records of other data
@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run pretrained on a folder, with its own-data kNN record (--final_eval), and a copy of its data."""
    base = tmp_path_factory.mktemp("records")
    data = _folder(base / "data")
    shutil.copytree(data, base / "other")
    assert main(FOLDER + [f"--data={data}", f"--log_dir={base / 'run'}", "--final_eval=knn", "--no-tsne"]) == 0
    return base


def _run_copy(folder_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(folder_run / "run", run)
    return run, folder_run / "data", folder_run / "other"


def _tagged(dataset, root):
    from engine.records import data_tag

    return data_tag(dataset, None if root is None else str(root))


def test_final_eval_writes_the_plain_record_with_its_data(folder_run, tmp_path):
    run, data, _ = _run_copy(folder_run, tmp_path)
    plain = record_path(str(run / "eval"), "knn", None, 1)  # what --final_eval and the sweeps read
    assert plain == str(run / "eval" / "knn_epoch0001.json")
    record = json.load(open(plain))
    assert {k: record[k] for k in ("dataset", "data_root", "data_train_images", "data_test_images")} == {
        "dataset": "folder", "data_root": str(data), "data_train_images": 8, "data_test_images": 4}


def test_an_evaluation_on_other_data_keeps_the_runs_record(folder_run, tmp_path, capsys):
    run, data, other = _run_copy(folder_run, tmp_path)
    plain = run / "eval" / "knn_epoch0001.json"
    kept = plain.read_bytes()
    shutil.copytree(other, tmp_path / "other")
    other = tmp_path / "other"
    (other / "train" / "b" / "3.png").unlink()  # other data indeed: 7 training images
    assert main(EVAL + ["--transfer_mode=knn", f"--checkpoint_dir={run}", f"--data={other}"]) == 0
    assert plain.read_bytes() == kept
    tagged = run / "eval" / f"knn_{_tagged('folder', other)}_epoch0001.json"
    assert re.fullmatch(r"knn_folder-other-[0-9a-f]{6}_epoch0001\.json", tagged.name)
    record = json.load(open(tagged))
    assert (record["data_root"], record["data_train_images"], record["data_test_images"]) == (str(other), 7, 4)
    assert main(EVAL + ["--transfer_mode=knn", f"--checkpoint_dir={run}", "--dataset_name=digits",
                        "--image_size=8"]) == 0
    digits = json.load(open(run / "eval" / "knn_digits_epoch0001.json"))
    assert (digits["dataset"], digits["data_root"], digits["data_train_images"]) == ("digits", None, 1437)
    assert plain.read_bytes() == kept
    capsys.readouterr()
    assert main(["--train_mode=summary", f"--checkpoint_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "knn_epoch0001 " in out and f"{tagged.stem} " in out and "knn_digits_epoch0001 " in out


def test_the_same_data_overwrites_its_record_however_its_root_is_spelled(folder_run, tmp_path, monkeypatch):
    run, data, _ = _run_copy(folder_run, tmp_path)
    plain = run / "eval" / "knn_epoch0001.json"
    os.symlink(data, tmp_path / "link")
    monkeypatch.chdir(data.parent)
    for spelling in (str(data), "data", "./data/", str(tmp_path / "link")):
        record = json.load(open(plain))
        plain.write_text(json.dumps({**record, "top1": -1.0}))  # an old result of the same data
        assert main(EVAL + ["--transfer_mode=knn", f"--checkpoint_dir={run}", f"--data={spelling}"]) == 0
        assert json.load(open(plain))["top1"] == record["top1"], spelling  # replaced, as a rerun should
    assert sorted(f for f in os.listdir(run / "eval") if f.endswith(".json")) == ["knn_epoch0001.json"]


def test_a_plain_record_of_other_data_is_never_overwritten(folder_run, tmp_path):
    run, data, other = _run_copy(folder_run, tmp_path)
    plain = run / "eval" / "knn_epoch0001.json"
    for old in ({"dataset": "cifar10", "top1": 91.0},  # an older version's record: no data root
                {"dataset": "folder", "data_root": str(other), "top1": 92.0}):
        plain.write_text(json.dumps(old))
        assert main(EVAL + ["--transfer_mode=knn", f"--checkpoint_dir={run}"]) == 0  # the run's own data
        assert json.loads(plain.read_text()) == old
        own = run / "eval" / f"knn_{_tagged('folder', data)}_epoch0001.json"
        assert json.load(open(own))["data_root"] == str(data)
        own.unlink()


def test_a_label_subset_of_other_data_is_its_own(folder_run, tmp_path):
    run, data, other = _run_copy(folder_run, tmp_path)
    shutil.copytree(other, tmp_path / "other")
    other = tmp_path / "other"
    (other / "train" / "a" / "0.png").unlink()  # 7 training images: the run's own indices would not fit
    common = EVAL + ["--transfer_mode=linear_eval", f"--checkpoint_dir={run}", "--semi_ratio=0.5", "--fc_epochs=1"]
    assert main(common) == 0
    assert main(common + [f"--data={other}"]) == 0
    own = json.load(open(run / "eval" / "semi_0.5_seed42.json"))
    theirs = json.load(open(run / "eval" / f"semi_0.5_seed42_{_tagged('folder', other)}.json"))
    assert len(own["indices"]) == len(theirs["indices"]) == 4 and max(theirs["indices"]) < 7
    assert os.path.isfile(run / "eval" / "linear_eval_semi0.5_epoch0001.json")
    assert os.path.isfile(run / "eval" / f"linear_eval_semi0.5_{_tagged('folder', other)}_epoch0001.json")


@pytest.mark.parametrize("protocol", ["knn", "linear_eval", "finetune", "logistic"])
def test_every_protocol_refuses_test_classes_that_are_not_the_runs(folder_run, tmp_path, capsys, protocol):
    run, _, other = _run_copy(folder_run, tmp_path)
    shutil.copytree(other, tmp_path / "other")
    other = tmp_path / "other"
    os.rename(other / "test" / "a", other / "test" / "z")
    before = _snapshot(tmp_path)
    assert main(EVAL + [f"--transfer_mode={protocol}", f"--checkpoint_dir={run}", f"--data={other}"]) == 2
    assert _err_lines(capsys) == [
        f"error: the class folders of {other / 'test'} are not those of {other / 'train'}: only in train: a; "
        "only in test: z; name the test folders as the training ones (a label is a folder name's place among the "
        "sorted names)"]
    assert _snapshot(tmp_path) == before
