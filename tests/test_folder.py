"""--data folder: one's own images in STEGO's directory layout, trained (with or without train labels) and
evaluated like the benchmarks; the README's "Your own data" commands on a tiny generated folder."""
import json
import os

import numpy as np
import torch
from PIL import Image

import eval as ev
import ppap

CLASSES = ["sky", "grass", "road"]
# the demo backbone (no download) on small images; everything else is the folder's own preset (COCO-Stuff's)
TINY = ["--data", "folder", "--arch", "vit_tiny_demo", "--device", "cpu", "--batch-size", "4", "--img-size", "56",
        "--val-size", "56", "--group", "196", "--trainpatchsplit", "4", "--max-steps", "3", "--val-every", "0",
        "--num-workers", "0", "--no-progress"]


def scene(i, h, w):
    """A picture of three horizontal bands (sky, grass, road) at heights that vary with i, and its labels."""
    rng = np.random.default_rng(i)
    a, b = sorted(rng.integers(h // 5, 4 * h // 5, 2))
    label = np.zeros((h, w), np.uint8)
    label[a:] = 1
    label[b:] = 2
    colours = np.array([[90, 140, 230], [60, 170, 70], [110, 110, 110]], np.float32)
    img = colours[label] + rng.normal(0, 12, (h, w, 3))
    label[:, :3] = 255                                            # an ignored margin
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_folder(root, n_train=8, n_val=4, train_labels=True, classes_txt=True):
    """STEGO's layout; among the train images a grey one and an RGBA one, of several sizes."""
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(os.path.join(root, "imgs", split))
        if split == "val" or train_labels:
            os.makedirs(os.path.join(root, "labels", split))
        for i in range(n):
            h, w = (60 + 7 * i, 80 + 5 * i)
            img, label = scene(i + 100 * (split == "val"), h, w)
            pil = Image.fromarray(img)
            if split == "train" and i == 1:
                pil = pil.convert("L")
            if split == "train" and i == 2:
                pil = pil.convert("RGBA")
            name = f"{split}_{i:03d}"
            pil.save(os.path.join(root, "imgs", split, name + (".jpg" if pil.mode == "RGB" and i % 2 else ".png")))
            if split == "val" or train_labels:
                Image.fromarray(label).save(os.path.join(root, "labels", split, name + ".png"))
    if classes_txt:
        with open(os.path.join(root, "classes.txt"), "w") as f:
            f.write("\n".join(CLASSES) + "\n")
    return root


def one_error(capsys, rc):
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_the_folder_reader_reads_every_mode_as_the_benchmarks_do(tmp_path):
    root = make_folder(str(tmp_path / "own"))
    cfg = ppap.make_config({"data": "folder", "data_dir": root, "arch": "vit_tiny_demo", "img_size": 56})
    train = ppap.build_dataset(cfg, "train")
    assert train.class_names == CLASSES and train.n_classes == 3 and len(train) == 8 and train.labelled
    for i, (img_path, lab_path) in enumerate(train.pairs):
        img, lab = train.load_raw(i)
        assert img.mode == "RGB" and lab.shape == (img.height, img.width)
        assert np.array_equal(np.asarray(img), np.asarray(ppap.open_rgb(img_path)))    # the benchmarks' reader
        raw = np.asarray(Image.open(lab_path)).astype(np.int64)
        assert np.array_equal(lab, np.where(raw == 255, -1, raw))                      # 255 = ignore
        item = train[i]
        assert item["img"].shape == (3, 56, 56) and item["label"].min() >= -1 and item["label"].max() <= 2
    grey = np.asarray(ppap.open_rgb(train.pairs[1][0]))
    assert np.array_equal(grey[..., 0], grey[..., 2])                                 # grey -> RGB
    # without classes.txt, --n-classes names the classes
    os.remove(os.path.join(root, "classes.txt"))
    cfg = ppap.make_config({"data": "folder", "data_dir": root, "arch": "vit_tiny_demo", "n_classes": 3})
    assert ppap.build_dataset(cfg, "val").class_names == ["class0", "class1", "class2"]


def test_train_and_evaluate_a_folder_with_and_without_train_labels(tmp_path, capsys):
    root = make_folder(str(tmp_path / "own"))
    run = str(tmp_path / "labelled")
    assert ppap.main(TINY + ["--data-dir", root, "--run", run]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "linear mIoU" in out
    ckpt = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    assert ckpt["class_names"] == CLASSES and ckpt["config"]["phi0"] == ppap.PRESETS[("cocostuff", "vit_small", 8)]["phi0"]
    assert ev.main(["--run", run, "--device", "cpu", "--num-workers", "0", "--kmeans", "--kmeans-samples", "500"]) == 0
    doc = json.loads(open(os.path.join(run, "eval", "folder-full-kmeans", "metrics.json")).read())
    assert set(doc["metrics"]) == {"cluster", "linear", "kmeans"} and list(doc["metrics"]["cluster"]["IoU"]) == CLASSES
    assert doc["n_images"] == 4 and os.path.exists(os.path.join(run, "eval", "folder-full-kmeans", "examples.png"))
    assert ev.main(["--summarize", run]) == 0
    assert "cluster/mIoU" in capsys.readouterr().out

    # labels/train removed: PPAP and the cluster probe train, the linear probe is skipped and not reported
    import shutil
    shutil.rmtree(os.path.join(root, "labels", "train"))
    run2 = str(tmp_path / "unlabelled")
    assert ppap.main(TINY + ["--data-dir", root, "--run", run2]) == 0
    out = capsys.readouterr().out
    assert "linear probe (which the authors train on train labels) is not trained and not reported" in out
    assert "unsupervised mIoU" in out and "linear mIoU" not in out
    log = [json.loads(line) for line in open(os.path.join(run2, "log.jsonl"))]
    assert "cluster_mIoU" in log[-1] and not any(k.startswith("linear") for k in log[-1])
    sd = torch.load(os.path.join(run2, "last.pt"), weights_only=True)["model"]
    assert not torch.equal(sd["head.mlp.fc1.weight"], sd["backbone.blocks.3.mlp.fc1.weight"])   # the head learned
    assert ev.main(["--run", run2, "--device", "cpu", "--num-workers", "0", "--propagation", "--batch-size", "4"]) == 0
    assert ev.main(["--run", run2, "--device", "cpu", "--num-workers", "0"]) == 0
    doc = json.loads(open(os.path.join(run2, "eval", "folder-full", "metrics.json")).read())
    assert set(doc["metrics"]) == {"cluster"}

    # labels/val removed too: the run trains and saves, and says nothing can be scored
    shutil.rmtree(os.path.join(root, "labels", "val"))
    run3 = str(tmp_path / "nothing")
    assert ppap.main(TINY + ["--data-dir", root, "--run", run3]) == 0
    assert "nothing scored" in capsys.readouterr().out
    assert torch.load(os.path.join(run3, "last.pt"), weights_only=True)["step"] == 3
    assert "have no labels: nothing can be scored" in one_error(
        capsys, ev.main(["--run", run3, "--device", "cpu", "--num-workers", "0"]))


def test_a_five_crop_folder_run(tmp_path, capsys):
    root = make_folder(str(tmp_path / "own"), n_train=2, train_labels=False)
    run = str(tmp_path / "five")
    assert ppap.main(TINY + ["--data-dir", root, "--five-crop", "--run", run]) == 0
    assert "train 10 images" in capsys.readouterr().out                            # 2 images x 5 crops
    crops = os.path.join(root, "cropped", "folder_five_crop_0.5")
    assert os.path.exists(os.path.join(crops, "DONE.json"))
    assert len(os.listdir(os.path.join(crops, "img", "train"))) == 10


def test_folder_mistakes_are_one_line(tmp_path, capsys):
    root = make_folder(str(tmp_path / "own"))
    bad = os.path.join(root, "labels", "val", "val_001.png")
    label = np.asarray(Image.open(bad)).copy()
    label[10, 10] = 7                                                               # 3 classes: 0, 1, 2
    Image.fromarray(label).save(bad)
    msg = one_error(capsys, ppap.main(TINY + ["--data-dir", root, "--run", str(tmp_path / "r1")]))
    assert bad in msg and "class 7" in msg and "3 classes" in msg
    os.remove(bad)
    msg = one_error(capsys, ppap.main(TINY + ["--data-dir", root, "--run", str(tmp_path / "r2")]))
    assert msg.startswith("error: missing " + bad)
    os.rename(os.path.join(root, "imgs", "val"), os.path.join(root, "imgs", "elsewhere"))
    msg = one_error(capsys, ppap.main(TINY + ["--data-dir", root, "--run", str(tmp_path / "r3")]))
    assert os.path.join(root, "imgs", "val") in msg and "DIR/imgs/{train,val}" in msg and "classes.txt" in msg
    other = make_folder(str(tmp_path / "other"), classes_txt=False)
    msg = one_error(capsys, ppap.main(TINY + ["--data-dir", other, "--run", str(tmp_path / "r4")]))
    assert "classes.txt" in msg and "--n-classes" in msg
