"""download.sh, offline: arguments, --help, --check-only on fake trees, --dry-run, and (with curl)
a resumed transfer + extraction from a file:// mirror."""
import os
import shutil
import subprocess
import zipfile

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "download.sh")
DINO = ["dino_deitsmall16_pretrain.pth", "dino_deitsmall8_300ep_pretrain.pth",
        "dino_vitbase16_pretrain.pth", "dino_vitbase8_pretrain.pth"]


def sh(*args, cwd=None, **env):
    e = {k: v for k, v in os.environ.items()
         if k not in ("PPAP_DATA", "IMAGENET_DIR", "IMAGENET_S", "DOWNLOADER", "CITYSCAPES_USERNAME",
                      "CITYSCAPES_PASSWORD", "PPAP_STEGO_MIRROR")}
    e.update(env)
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=60)


def touch(path, data=b""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def fake_tree(root, name):
    """Empty files in the layout download.sh checks (the loaders' own layout)."""
    r = os.path.join(root, name)
    if name == "cocostuff":
        for split, lst in (("train2017", "Coco164kFull_Stuff_Coarse.txt"), ("val2017", "Coco164kFull_Stuff_Coarse_7.txt")):
            ids = [f"{split}{i:03d}" for i in range(3)]
            touch(f"{r}/curated/{split}/{lst}", ("\n".join(ids) + "\n").encode())
            for i in ids:
                touch(f"{r}/images/{split}/{i}.jpg")
                touch(f"{r}/annotations/{split}/{i}.png")
    elif name == "cityscapes":
        for split in ("train", "val"):
            touch(f"{r}/leftImg8bit/{split}/aachen/aachen_000000_000019_leftImg8bit.png")
            touch(f"{r}/gtFine/{split}/aachen/aachen_000000_000019_gtFine_labelIds.png")
    elif name == "potsdam":
        for lst, ids in (("labelled_train.txt", ["a", "b"]), ("labelled_test.txt", ["c"])):
            touch(f"{r}/{lst}", ("\n".join(ids) + "\n").encode())
            for i in ids:
                touch(f"{r}/imgs/{i}.mat")
                touch(f"{r}/gt/{i}.mat")
    elif name == "imagenet-s":
        for split in ("validation", "train-semi"):
            touch(f"{r}/ImageNetS50/{split}-segmentation/n01443537/x_{split}.png")
            touch(f"{r}/ImageNetS50/{split}/n01443537/x_{split}.JPEG")
    return r


def test_help():
    p = sh("--help")
    assert p.returncode == 0
    assert p.stdout.startswith("usage: bash download.sh <cocostuff|cityscapes|potsdam|imagenet-s|weights|all>")
    for word in ("--check-only", "--dry-run", "curl -C -", "wget -c", "TORCH_HOME", "IMAGENET_DIR",
                 "CITYSCAPES_USERNAME"):
        assert word in p.stdout
    assert sh("-h").stdout == p.stdout
    assert sh("cocostuff", "d", "--help").returncode == 0


@pytest.mark.parametrize("args,msg", [
    ((), "no dataset given"),
    (("foo",), "unknown dataset 'foo'"),
    (("cocostuff", "d", "--frobnicate"), "unknown option --frobnicate"),
    (("cocostuff", "d", "extra"), "unexpected argument extra"),
])
def test_bad_arguments(tmp_path, args, msg):
    p = sh(*args, cwd=tmp_path)
    assert p.returncode != 0
    assert msg in p.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name,remove", [
    ("cocostuff", "annotations/val2017"),
    ("cocostuff", "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"),
    ("cocostuff", "images/train2017/train2017001.jpg"),
    ("cityscapes", "gtFine/val"),
    ("potsdam", "gt/c.mat"),
    ("potsdam", "labelled_train.txt"),
    ("imagenet-s", "ImageNetS50/validation/n01443537/x_validation.JPEG"),
])
def test_check_only(tmp_path, name, remove):
    root = fake_tree(str(tmp_path / "data"), name)
    p = sh(name, "data", "--check-only", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"OK: {name} complete in data/{name}" in p.stdout
    target = os.path.join(root, remove)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    p = sh(name, "data", "--check-only", cwd=tmp_path)
    assert p.returncode == 1
    missing = [ln for ln in p.stdout.splitlines() if ln.startswith("missing: ")]
    expect = os.path.join("data", name, remove if not remove.endswith("x_validation.JPEG")
                          else "ImageNetS50/validation/n01443537/x_validation.JPEG")
    assert f"missing: {expect}" in missing, p.stdout
    assert len(missing) == 1, p.stdout
    assert f"bash download.sh {name} data" in p.stderr
    assert "error:" in p.stderr


def test_check_only_weights(tmp_path):
    th = tmp_path / "th"
    for f in DINO:
        touch(str(th / "hub" / "checkpoints" / f))
    p = sh("weights", "--check-only", TORCH_HOME=str(th))
    assert p.returncode == 0 and "OK: weights complete" in p.stdout
    os.remove(th / "hub" / "checkpoints" / DINO[2])
    p = sh("weights", "--check-only", TORCH_HOME=str(th))
    assert p.returncode == 1
    assert p.stdout.strip() == f"missing: {th}/hub/checkpoints/{DINO[2]}"


def test_check_only_all_and_default_dir(tmp_path):
    fake_tree(str(tmp_path / "data"), "potsdam")
    p = sh("all", "--check-only", cwd=tmp_path, TORCH_HOME=str(tmp_path / "th"))
    assert p.returncode == 1
    assert "OK: potsdam complete in ./data/potsdam" in p.stdout
    assert "incomplete: cocostuff cityscapes imagenet-s weights" in p.stderr
    p = sh("potsdam", "--check-only", cwd=tmp_path / "data", PPAP_DATA=".")   # $PPAP_DATA default
    assert p.returncode == 0 and "OK: potsdam complete in ./potsdam" in p.stdout


@pytest.mark.parametrize("downloader,flag", [("curl", " -C - "), ("wget", " -c ")])
def test_dry_run_shows_resumable_commands(tmp_path, downloader, flag):
    for name, url in (("cocostuff", "stego-public/pytorch_data/cocostuff.zip"),
                      ("potsdam", "stego-public/pytorch_data/potsdam.zip"),
                      ("cityscapes", "stego-public/pytorch_data/cityscapes.zip"),
                      ("imagenet-s", "LUSSeg/ImageNet-S/releases/download/ImageNet-S/ImageNetS50-")):
        p = sh(name, "data", "--dry-run", cwd=tmp_path, DOWNLOADER=downloader)
        assert p.returncode == 0, p.stderr
        cmds = [ln for ln in p.stdout.splitlines() if ln.startswith(f"+ {downloader} ")]
        assert len(cmds) == 1 and flag in cmds[0] + " " and url in cmds[0], p.stdout
        assert any(ln.startswith("+ unzip ") or "zipfile" in ln for ln in p.stdout.splitlines())
    p = sh("weights", "--dry-run", DOWNLOADER=downloader, TORCH_HOME=str(tmp_path / "th"))
    cmds = [ln for ln in p.stdout.splitlines() if ln.startswith(f"+ {downloader} ")]
    assert len(cmds) == 4
    for f, c in zip(DINO, cmds):
        assert flag in c + " "
        assert f"https://dl.fbaipublicfiles.com/dino/{f[:-4]}/{f}" in c
        assert f"{tmp_path}/th/hub/checkpoints/{f}.part" in c
    assert not os.listdir(tmp_path)                       # a dry run changes nothing


def _mirror(tmp_path, top_folder=True):
    src = tmp_path / "src"
    files = {"imgs/a.mat": os.urandom(150_000), "gt/a.mat": os.urandom(2000), "imgs/b.mat": os.urandom(150_000),
             "gt/b.mat": os.urandom(2000), "labelled_train.txt": b"a\n", "labelled_test.txt": b"b\n"}
    os.makedirs(tmp_path / "mirror")
    with zipfile.ZipFile(tmp_path / "mirror" / "potsdam.zip", "w") as z:
        for k, v in files.items():
            z.writestr(("potsdam/" if top_folder else "") + k, v)
    return files, (tmp_path / "mirror" / "potsdam.zip").read_bytes()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (file:// URLs)")
@pytest.mark.parametrize("top_folder", [True, False])
def test_resumed_download_and_extract(tmp_path, top_folder):
    files, blob = _mirror(tmp_path, top_folder)
    data = tmp_path / "data"
    touch(str(data / ".downloads" / "potsdam.zip.part"), blob[:len(blob) // 3])   # an interrupted transfer
    mirror = f"file://{tmp_path}/mirror"
    p = sh("potsdam", str(data), PPAP_STEGO_MIRROR=mirror, DOWNLOADER="curl")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Resuming transfer from byte position" in p.stderr     # continued, not restarted
    assert f"OK: potsdam complete in {data}/potsdam" in p.stdout
    for k, v in files.items():
        assert (data / "potsdam" / k).read_bytes() == v
    assert sorted(os.listdir(data)) == [".downloads", "potsdam"] and not os.listdir(data / ".downloads")
    p = sh("potsdam", str(data), PPAP_STEGO_MIRROR="file:///nonexistent")             # idempotent
    assert p.returncode == 0 and "already complete" in p.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (file:// URLs)")
def test_corrupt_archive_is_reported(tmp_path):
    files, blob = _mirror(tmp_path)
    bad = bytearray(blob)
    bad[1000:1010] = b"\0" * 10                      # inside the first member: CRC error, same size
    (tmp_path / "mirror" / "potsdam.zip").write_bytes(bytes(bad))
    p = sh("potsdam", str(tmp_path / "data"), PPAP_STEGO_MIRROR=f"file://{tmp_path}/mirror", DOWNLOADER="curl")
    assert p.returncode != 0
    assert "corrupt" in p.stderr
    assert not (tmp_path / "data" / "potsdam").exists()


def test_imagenet_s_links_images(tmp_path):
    root = fake_tree(str(tmp_path / "data"), "imagenet-s")
    shutil.rmtree(os.path.join(root, "ImageNetS50", "validation"))
    shutil.rmtree(os.path.join(root, "ImageNetS50", "train-semi"))
    inet = tmp_path / "imagenet"
    touch(str(inet / "val" / "x_validation.JPEG"), b"v")                  # flat val folder
    touch(str(inet / "train" / "n01443537" / "x_train-semi.JPEG"), b"t")
    p = sh("imagenet-s", "data", "--check-only", cwd=tmp_path)
    assert p.returncode == 1 and "IMAGENET_DIR=" in p.stderr
    p = sh("imagenet-s", "data", cwd=tmp_path)
    assert p.returncode == 1 and "IMAGENET_DIR=<IMAGENET_DIR> bash download.sh imagenet-s data" in p.stdout
    p = sh("imagenet-s", "data", cwd=tmp_path, IMAGENET_DIR=str(inet))
    assert p.returncode == 0, p.stdout + p.stderr
    img = os.path.join(root, "ImageNetS50", "validation", "n01443537", "x_validation.JPEG")
    assert os.path.islink(img) and open(img, "rb").read() == b"v"
