"""download.sh, offline: arguments, --help, --check-only on fake trees, --dry-run, (with curl) a
resumed transfer + extraction from a file:// mirror, DINOv2 weights, the authors' checkpoints
through a fake Google Drive (file:// trees, and a local HTTP server for curl and wget), and a local
mirror that misbehaves (error answers, no Range support, bodies cut short, pages instead of files)."""
import http.server
import io
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
import zipfile

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "download.sh")
DINO = ["dino_deitsmall16_pretrain.pth", "dino_deitsmall8_300ep_pretrain.pth",
        "dino_vitbase16_pretrain.pth", "dino_vitbase8_pretrain.pth"]
DINOV2 = ["dinov2_vits14/dinov2_vits14_pretrain.pth", "dinov2_vitb14/dinov2_vitb14_pretrain.pth",
          "dinov2_vits14/dinov2_vits14_reg4_pretrain.pth", "dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"]
CKPTS = [("ppap_cocostuff_vits8.pth", "162h3jZfribkfHcGQ_6THp8mLYbnST_P0", "cocostuff", "vit_small", "8"),
         ("ppap_cocostuff_vits16.pth", "1U6fsOnZJev5gj6LTjtb8x1iPjzjy1nOX", "cocostuff", "vit_small", "16"),
         ("ppap_cityscapes_vitb8.pth", "1kATTeEH3LllmGz3PPyn34lyBxavSUGLe", "cityscapes", "vit_base", "8"),
         ("ppap_potsdam_vitb8.pth", "1CDngRnD8bVqzuILTmbink61hB4IUVzxE", "potsdam", "vit_base", "8")]
PICKLE = b"\x80\x02}q\x00."          # a pickled {} (protocol 2): what a legacy torch.save starts with
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (file:// URLs)")


def sh(*args, cwd=None, **env):
    e = {k: v for k, v in os.environ.items()
         if k not in ("PPAP_DATA", "IMAGENET_DIR", "IMAGENET_S", "DOWNLOADER", "CITYSCAPES_USERNAME",
                      "CITYSCAPES_PASSWORD", "PPAP_STEGO_MIRROR", "PPAP_CHECKPOINTS", "WEIGHTS",
                      "PPAP_DRIVE_BASE", "PPAP_DRIVE_CONFIRM_BASE", "PPAP_DINO_BASE", "PPAP_DINOV2_BASE")}
    e.setdefault("PYTHON", sys.executable)    # (not a slow pyenv shim: the script runs python for its checks)
    e.update(env)
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=e, capture_output=True, text=True,
                          errors="replace", timeout=60)   # (a failing run may echo binary bytes)


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
    assert p.stdout.startswith("usage: bash download.sh <cocostuff|cityscapes|potsdam|imagenet-s|weights|checkpoints|all>")
    for word in ("--check-only", "--dry-run", "curl -C -", "wget -c", "TORCH_HOME", "IMAGENET_DIR",
                 "CITYSCAPES_USERNAME", "WEIGHTS=dino|dinov2|all", "PPAP_CHECKPOINTS", "checkpoints.tsv",
                 "PPAP_DRIVE_BASE", "PPAP_DRIVE_CONFIRM_BASE", "PPAP_DINOV2_BASE"):
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
    hub = th / "hub" / "checkpoints"
    for f in DINO + [os.path.basename(f) for f in DINOV2]:
        touch(str(hub / f), PICKLE)
    p = sh("weights", "--check-only", TORCH_HOME=str(th))
    assert p.returncode == 0 and "OK: weights complete" in p.stdout
    os.remove(hub / DINO[2])
    p = sh("weights", "--check-only", TORCH_HOME=str(th))
    assert p.returncode == 1
    assert p.stdout.strip() == f"missing: {hub}/{DINO[2]}"
    p = sh("weights", "--check-only", TORCH_HOME=str(th), WEIGHTS="dinov2")      # DINOv2 only: complete
    assert p.returncode == 0 and "OK: weights complete" in p.stdout
    touch(str(hub / "dinov2_vitb14_pretrain.pth"), b"<!DOCTYPE html><html><title>Error</title></html>")
    os.remove(hub / "dinov2_vits14_reg4_pretrain.pth")
    p = sh("weights", "--check-only", TORCH_HOME=str(th), WEIGHTS="dinov2")
    assert p.returncode == 1
    assert p.stdout.splitlines() == [
        f'invalid: {hub}/dinov2_vitb14_pretrain.pth is an HTML page ("Error"), not a torch checkpoint',
        f"missing: {hub}/dinov2_vits14_reg4_pretrain.pth"]
    assert "WEIGHTS=dinov2 bash download.sh weights" in p.stderr
    p = sh("weights", "--check-only", WEIGHTS="dinov3")
    assert p.returncode == 2 and "WEIGHTS must be dino, dinov2 or all" in p.stderr


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
    assert len(cmds) == 8                                 # WEIGHTS=all: DINO, then DINOv2
    for f, c in zip(DINO, cmds[:4]):
        assert flag in c + " "
        assert f"https://dl.fbaipublicfiles.com/dino/{f[:-4]}/{f}" in c
        assert f"{tmp_path}/th/hub/checkpoints/{f}.part" in c
    for f, c in zip(DINOV2, cmds[4:]):
        assert flag in c + " "
        assert f"https://dl.fbaipublicfiles.com/dinov2/{f}" in c
        assert f"{tmp_path}/th/hub/checkpoints/{os.path.basename(f)}.part" in c
    assert f"+ mkdir -p {tmp_path}/th/hub/checkpoints" in p.stdout
    for which, n, base in (("dino", 4, "dino/"), ("dinov2", 4, "dinov2/")):
        p = sh("weights", "--dry-run", DOWNLOADER=downloader, TORCH_HOME=str(tmp_path / "th"), WEIGHTS=which)
        cmds = [ln for ln in p.stdout.splitlines() if ln.startswith(f"+ {downloader} ")]
        assert len(cmds) == n and all(f"https://dl.fbaipublicfiles.com/{base}" in c for c in cmds)
    assert not os.listdir(tmp_path)                       # a dry run changes nothing


def test_dry_run_all_claims_nothing(tmp_path):
    p = sh("all", "data", "--dry-run", cwd=tmp_path, TORCH_HOME=str(tmp_path / "th"))
    assert p.returncode == 0, p.stderr
    assert "complete" not in p.stdout
    assert p.stdout.rstrip().endswith("dry run: nothing was downloaded (run it without --dry-run to fetch)")
    assert "ppap_" not in p.stdout                         # the authors' checkpoints are not part of `all`
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("downloader", ["curl", "wget"])
def test_checkpoints_dry_run(tmp_path, downloader):
    p = sh("checkpoints", "--dry-run", cwd=tmp_path, DOWNLOADER=downloader)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    for name, fid, ds, arch, patch in CKPTS:
        assert f"[download.sh] {name} <- Google Drive file {fid} ({ds}, {arch}/{patch})" in lines
        probe = [ln for ln in lines if ln.startswith(f"+ {downloader} ") and fid in ln]
        assert len(probe) == 1 and "https://drive.google.com/uc" in probe[0], p.stdout
        assert f"+ mv -f ./checkpoints/{name}.part ./checkpoints/{name}" in lines
    flag = " -C - " if downloader == "curl" else " -c "
    assert sum(ln.startswith(f"+ {downloader} ") and flag in ln for ln in lines) == 4
    assert lines[-1] == "[download.sh] dry run: nothing was downloaded"
    assert not os.listdir(tmp_path)
    p = sh("checkpoints", "ck", "--dry-run", cwd=tmp_path, PPAP_CHECKPOINTS="elsewhere")   # DIR argument wins
    assert "+ mv -f ck/ppap_potsdam_vitb8.pth.part ck/ppap_potsdam_vitb8.pth" in p.stdout
    p = sh("checkpoints", "--dry-run", cwd=tmp_path, PPAP_CHECKPOINTS="elsewhere")
    assert "+ mv -f elsewhere/ppap_potsdam_vitb8.pth.part elsewhere/ppap_potsdam_vitb8.pth" in p.stdout
    assert not os.listdir(tmp_path)


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


# ---------------------------------------------------------------- weights and checkpoints over file:// / HTTP
def fake_ckpt(i):
    """A small torch checkpoint (a zip from torch.save; a zip written by hand without torch), ~120 kB so
    that it is larger than download.sh's 64 KiB probe of Google Drive."""
    try:
        import torch
    except ImportError:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", PICKLE)
            z.writestr("archive/data/0", bytes([i]) * 120_000)
        return buf.getvalue()
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.arange(30_000, dtype=torch.float32) + i}, "i": i}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt_bytes():
    return [fake_ckpt(i) for i in range(len(CKPTS))]


def confirm_form(fid, uuid="5e1ce2c3-0d3a-4c5b-9a1e-7f00c0ffee00"):
    """Google Drive's current 'can't scan this file for viruses' page (its shape, not its text)."""
    return (f'<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title><meta charset="utf-8">'
            f'</head><body><div class="uc-main"><p class="uc-warning-subcaption">Google Drive can\'t scan '
            f'this file for viruses.</p><form id="download-form" action="https://drive.usercontent.google.com/'
            f'download" method="get"><input type="submit" id="uc-download-link" class="goog-inline-block '
            f'jfk-button jfk-button-action" value="Download anyway"/><input type="hidden" name="id" '
            f'value="{fid}"><input type="hidden" name="export" value="download"><input type="hidden" '
            f'name="confirm" value="t"><input type="hidden" name="uuid" value="{uuid}"></form></div>'
            f'</body></html>').encode()


def confirm_link(fid, token):
    """The older page: a 'Download anyway' link carrying a confirm token."""
    return (f"<html><head><title>Google Drive - Virus scan warning</title></head><body>\n"
            f"<a id=\"uc-download-link\" class=\"goog-inline-block jfk-button\"\n"
            f" href=\"/uc?export=download&amp;confirm={token}&amp;id={fid}\">Download anyway</a>\n"
            f"</body></html>").encode()


QUOTA = (b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body><p>Too many "
         b"users have viewed or downloaded this file recently.</p></body></html>")


def drive_tree(root, pages, files):
    """A file:// Google Drive: the script maps BASE?a=1&b=2 to BASE/a=1/b=2 for file:// bases."""
    for rel, data in {**pages, **files}.items():
        touch(os.path.join(root, rel), data)
    return dict(PPAP_DRIVE_BASE=f"file://{root}/uc", PPAP_DRIVE_CONFIRM_BASE=f"file://{root}/download",
                DOWNLOADER="curl")


def first_page(fid):
    return f"uc/export=download/id={fid}"


def form_target(fid, uuid="5e1ce2c3-0d3a-4c5b-9a1e-7f00c0ffee00"):
    return f"download/id={fid}/export=download/confirm=t/uuid={uuid}"


def error_lines(p):
    return [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]


@needs_curl
def test_checkpoints_through_confirmation_form(tmp_path, ckpt_bytes):
    env = drive_tree(str(tmp_path / "drive"),
                     {first_page(c[1]): confirm_form(c[1]) for c in CKPTS},
                     {form_target(c[1]): b for c, b in zip(CKPTS, ckpt_bytes)})
    p = sh("checkpoints", "ck", cwd=tmp_path, **env)
    assert p.returncode == 0, p.stdout + p.stderr
    ck = tmp_path / "ck"
    assert sorted(os.listdir(ck)) == sorted([c[0] for c in CKPTS] + ["checkpoints.tsv"])   # no leftovers
    for c, b in zip(CKPTS, ckpt_bytes):
        assert (ck / c[0]).read_bytes() == b
    assert (ck / "checkpoints.tsv").read_text() == (
        "name\tfile_id\tdataset\tarch\tpatch\n" + "".join("\t".join(c) + "\n" for c in CKPTS))
    assert "OK: checkpoints complete in ck" in p.stdout
    try:
        import torch
        assert torch.load(ck / CKPTS[2][0], weights_only=True)["i"] == 2
    except ImportError:
        pass
    before = {f: os.stat(ck / f).st_mtime_ns for f in os.listdir(ck) if f.endswith(".pth")}
    p = sh("checkpoints", "ck", cwd=tmp_path, PPAP_DRIVE_BASE="file:///nonexistent")   # left alone, no network
    assert p.returncode == 0 and "OK: checkpoints already complete" in p.stdout, p.stdout + p.stderr
    assert {f: os.stat(ck / f).st_mtime_ns for f in before} == before
    p = sh("checkpoints", "ck", "--check-only", cwd=tmp_path)
    assert p.returncode == 0 and "OK: checkpoints complete in ck" in p.stdout


@needs_curl
def test_checkpoints_old_confirm_link_and_direct(tmp_path, ckpt_bytes):
    (a, fa, *_), (b, fb, *_), (c, fc, *_), (d, fd, *_) = CKPTS
    env = drive_tree(str(tmp_path / "drive"),
                     {first_page(fa): confirm_link(fa, "Xy_9-z"), first_page(fb): confirm_link(fb, "Q1"),
                      first_page(fc): ckpt_bytes[2],                     # small enough: served directly
                      first_page(fd): confirm_form(fd, uuid="u-2")},
                     {f"uc/export=download/confirm=Xy_9-z/id={fa}": ckpt_bytes[0],
                      f"uc/export=download/confirm=Q1/id={fb}": ckpt_bytes[1],
                      form_target(fd, uuid="u-2"): ckpt_bytes[3]})
    p = sh("checkpoints", str(tmp_path / "ck"), **env)
    assert p.returncode == 0, p.stdout + p.stderr
    for (name, *_), blob in zip(CKPTS, ckpt_bytes):
        assert (tmp_path / "ck" / name).read_bytes() == blob


@needs_curl
def test_checkpoints_html_instead_of_file(tmp_path, ckpt_bytes):
    (a, fa, *_), (b, fb, *_), (c, fc, *_), (d, fd, *_) = CKPTS
    env = drive_tree(str(tmp_path / "drive"),
                     {first_page(fa): QUOTA,                               # quota page, no form
                      first_page(fb): confirm_form(fb), first_page(fc): confirm_form(fc),
                      first_page(fd): confirm_form(fd)},
                     {form_target(fb): confirm_form(fb),                   # the confirm page again
                      form_target(fc): ckpt_bytes[2], form_target(fd): ckpt_bytes[3]})
    p = sh("checkpoints", "ck", cwd=tmp_path, **env)
    assert p.returncode == 1
    errs = error_lines(p)
    assert len(errs) == 2, p.stderr                                         # one line per failure
    assert errs[0] == (f'error: Google Drive sent an HTML page ("Google Drive - Quota exceeded") instead of {a} '
                       f'(file://{tmp_path}/drive/uc/export=download/id={fa}) -> download it by hand from '
                       f'https://drive.google.com/file/d/{fa}/view and save it as ck/{a}')
    assert errs[1].startswith(f'error: Google Drive sent an HTML page ("Google Drive - Virus scan warning") '
                              f'instead of {b} (file://{tmp_path}/drive/{form_target(fb)}) -> download it by hand')
    assert errs[1].endswith(f"https://drive.google.com/file/d/{fb}/view and save it as ck/{b}")
    assert sorted(os.listdir(tmp_path / "ck")) == sorted([c, d, "checkpoints.tsv"])    # no HTML kept, no .part
    assert f"missing: ck/{a} (from https://drive.google.com/file/d/{fa}/view)" in p.stdout
    assert f"not fetched: {a} {b}" in p.stdout


@needs_curl
def test_checkpoints_resume_partial(tmp_path, ckpt_bytes):
    name, fid = CKPTS[0][:2]
    blob = ckpt_bytes[0]
    env = drive_tree(str(tmp_path / "drive"), {first_page(fid): confirm_form(fid)}, {form_target(fid): blob})
    touch(str(tmp_path / "ck" / f"{name}.part"), blob[:len(blob) // 3])        # an interrupted transfer
    p = sh("checkpoints", "ck", cwd=tmp_path, **env)
    assert p.returncode == 1                                                  # the other three are not served
    assert f"Resuming transfer from byte position {len(blob) // 3}" in p.stderr
    assert (tmp_path / "ck" / name).read_bytes() == blob
    assert not (tmp_path / "ck" / f"{name}.part").exists()
    assert len(error_lines(p)) == 3 and all("got nothing from Google Drive" in e for e in error_lines(p))


def test_checkpoints_check_only(tmp_path, ckpt_bytes):
    ck = tmp_path / "ck"
    touch(str(ck / CKPTS[0][0]), ckpt_bytes[0])
    touch(str(ck / CKPTS[1][0]), PICKLE)                                      # a legacy (pickle) checkpoint
    touch(str(ck / CKPTS[2][0]), QUOTA)                                       # HTML saved under the name
    p = sh("checkpoints", "--check-only", cwd=tmp_path, PPAP_CHECKPOINTS="ck")
    assert p.returncode == 1
    assert p.stdout.splitlines() == [
        f'invalid: ck/{CKPTS[2][0]} is an HTML page ("Google Drive - Quota exceeded"), not a torch checkpoint '
        f'(from https://drive.google.com/file/d/{CKPTS[2][1]}/view)',
        f"missing: ck/{CKPTS[3][0]} (from https://drive.google.com/file/d/{CKPTS[3][1]}/view)",
        "missing: ck/checkpoints.tsv"]
    assert error_lines(p) == ["error: checkpoints incomplete in ck (3 missing or invalid) — run: "
                              "bash download.sh checkpoints ck"]
    touch(str(ck / CKPTS[3][0]), ckpt_bytes[3][:50_000])                       # a truncated zip
    p = sh("checkpoints", "ck", "--check-only", cwd=tmp_path)
    assert f"invalid: ck/{CKPTS[3][0]} is 50000 bytes starting with 50 4b 03 04, not a torch" in p.stdout
    assert sorted(os.listdir(ck)) == sorted(c[0] for c in CKPTS)               # --check-only writes nothing


@needs_curl
def test_dinov2_weights_over_file_url(tmp_path, ckpt_bytes):
    mirror = tmp_path / "dinov2"
    for f, b in zip(DINOV2, ckpt_bytes):
        touch(str(mirror / f), b)
    th = tmp_path / "th"                              # no hub/checkpoints/ yet: the script creates it
    hub = th / "hub" / "checkpoints"
    env = dict(TORCH_HOME=str(th), WEIGHTS="dinov2", PPAP_DINOV2_BASE=f"file://{mirror}", DOWNLOADER="curl")
    p = sh("weights", **env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(os.listdir(hub)) == sorted(os.path.basename(f) for f in DINOV2)
    for f, b in zip(DINOV2, ckpt_bytes):
        assert (hub / os.path.basename(f)).read_bytes() == b
    os.remove(hub / "dinov2_vitb14_pretrain.pth")
    touch(str(hub / "dinov2_vitb14_pretrain.pth.part"), ckpt_bytes[1][:40_000])   # an interrupted transfer
    p = sh("weights", **env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Resuming transfer from byte position 40000" in p.stderr
    assert (hub / "dinov2_vitb14_pretrain.pth").read_bytes() == ckpt_bytes[1]
    assert sorted(os.listdir(hub)) == sorted(os.path.basename(f) for f in DINOV2)
    p = sh("weights", **{**env, "PPAP_DINOV2_BASE": "file:///nonexistent"})   # complete: no network
    assert p.returncode == 0 and "OK: weights already complete" in p.stdout


@needs_curl
def test_failing_transfers_print_an_error_line(tmp_path, ckpt_bytes):
    mirror = tmp_path / "dinov2"
    touch(str(mirror / DINOV2[0]), QUOTA)                   # an error page where the weights should be
    env = dict(TORCH_HOME=str(tmp_path / "th"), WEIGHTS="dinov2", PPAP_DINOV2_BASE=f"file://{mirror}",
               DOWNLOADER="curl")
    p = sh("weights", **env)
    url = f"file://{mirror}/{DINOV2[0]}"
    assert p.returncode == 1
    assert error_lines(p) == [f'error: dinov2_vits14_pretrain.pth came as an HTML page ("Google Drive - Quota '
                              f'exceeded"), not a torch checkpoint ({url}) -> open that address in a browser to '
                              f'see why, or set PPAP_DINOV2_BASE to a copy that has the file, then run the same '
                              f'command again']
    assert not os.listdir(tmp_path / "th" / "hub" / "checkpoints")
    touch(str(mirror / DINOV2[0]), ckpt_bytes[0])           # the next one is not there at all
    p = sh("weights", **env)
    url = f"file://{mirror}/{DINOV2[1]}"
    assert p.returncode == 1
    assert error_lines(p) == [f"error: download failed, curl exit status 37 ({url}) -> run the same command "
                              f"again to resume from {tmp_path}/th/hub/checkpoints/dinov2_vitb14_pretrain.pth.part"]
    p = sh("potsdam", str(tmp_path / "data"), PPAP_STEGO_MIRROR="file:///nonexistent", DOWNLOADER="curl")
    assert p.returncode == 1
    assert error_lines(p) == ["error: download failed, curl exit status 37 (file:///nonexistent/potsdam.zip) -> "
                              f"run the same command again to resume from {tmp_path}/data/.downloads/potsdam.zip.part"]


class FakeDrive(http.server.BaseHTTPRequestHandler):
    """Google Drive's large-file flows over real HTTP (query strings, redirects, cookies, ranges)."""
    files, style, log = {}, "form", []

    def log_message(self, *args):
        pass

    def send_file(self, blob):
        rng = self.headers.get("Range") if self.style != "norange" else None
        start, end = 0, len(blob) - 1
        if rng:
            a, _, b = rng.split("=", 1)[1].partition("-")
            start, end = int(a), min(int(b) if b else len(blob) - 1, len(blob) - 1)
            if start >= len(blob):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(blob)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(blob)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        self.wfile.write(blob[start:end + 1])

    def send_page(self, html, cookie=None):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(html)))
        if cookie:
            self.send_header("Set-Cookie", cookie + "; Path=/")
        self.end_headers()
        self.wfile.write(html)

    def do_GET(self):
        u = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        self.log.append((u.path, q, self.headers.get("Range"), self.headers.get("Cookie")))
        blob = self.files.get(q.get("id"))
        cookie_ok = f"download_warning_13058={'tok' + q.get('id', '')[:4]}" in (self.headers.get("Cookie") or "")
        if blob is None:
            self.send_error(404)
        elif u.path == "/uc" and "confirm" not in q:
            if self.style == "direct":
                self.send_file(blob)
            elif self.style in ("form", "norange"):   # drive.google.com/uc redirects to drive.usercontent
                self.send_response(303)
                self.send_header("Location", f"/download?id={q['id']}&export=download")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:                              # older: page + download_warning cookie (+ link)
                tok = "tok" + q["id"][:4]
                page = confirm_link(q["id"], tok) if self.style == "link" else b"<html><title>Warning</title></html>"
                self.send_page(page, cookie=f"download_warning_13058={tok}")
        elif u.path == "/uc" and q.get("confirm") == "tok" + q["id"][:4] and cookie_ok:
            self.send_file(blob)
        elif u.path == "/download" and "confirm" not in q:
            self.send_page(confirm_form(q["id"], uuid="uu-" + q["id"][:5]))
        elif u.path == "/download" and q.get("confirm") == "t" and q.get("uuid") == "uu-" + q["id"][:5]:
            self.send_file(blob)
        else:
            self.send_error(403)


def serving(handler):
    """A local HTTP server with `handler` for the test's duration -> its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake_drive(ckpt_bytes):
    FakeDrive.files = {c[1]: b for c, b in zip(CKPTS, ckpt_bytes)}
    FakeDrive.log = []
    yield from serving(FakeDrive)


def legacy_ckpt():
    """A checkpoint in torch's legacy (pickle, not zip) format."""
    try:
        import torch
    except ImportError:
        return PICKLE + bytes(100_000)
    buf = io.BytesIO()
    torch.save({"w": torch.ones(25_000)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


@pytest.mark.parametrize("downloader,style,part", [
    ("curl", "form", 70_000), ("wget", "form", 70_000), ("curl", "link", 70_000), ("wget", "link", 70_000),
    ("curl", "cookie", 70_000), ("wget", "direct", 70_000),
    ("curl", "norange", 70_000), ("wget", "norange", 70_000),     # resume refused (200): starts over
    ("curl", "form", "whole"), ("wget", "form", "whole"),         # a whole legacy .part: 416, kept
    ("curl", "form", "html"), ("wget", "form", "html"),           # a .part that is a page: starts over
    ("curl", "form", "dest-cut"), ("wget", "form", "dest-cut"),   # a cut-short zip under the name: resumed
])
def test_checkpoints_over_http(tmp_path, fake_drive, ckpt_bytes, downloader, style, part):
    if shutil.which(downloader) is None:
        pytest.skip(f"needs {downloader}")
    FakeDrive.style = style
    name, fid = CKPTS[1][:2]
    ck = tmp_path / "ck"
    for i in (0, 2, 3):                                                       # present already: left alone
        touch(str(ck / CKPTS[i][0]), ckpt_bytes[i])
    if part == "whole":
        blob = FakeDrive.files[fid] = legacy_ckpt()
        touch(str(ck / f"{name}.part"), blob)
        assert blob[:2] == b"\x80\x02"
    elif part == "html":
        blob = ckpt_bytes[1]
        touch(str(ck / f"{name}.part"), QUOTA)
    elif part == "dest-cut":
        blob = ckpt_bytes[1]
        touch(str(ck / name), blob[:70_000])
    else:
        blob = ckpt_bytes[1]
        touch(str(ck / f"{name}.part"), blob[:part])                        # an interrupted transfer
    p = sh("checkpoints", str(ck), DOWNLOADER=downloader, PPAP_DRIVE_BASE=f"{fake_drive}/uc",
           PPAP_DRIVE_CONFIRM_BASE=f"{fake_drive}/download")
    assert p.returncode == 0, p.stdout + p.stderr
    for (n, *_), b in zip(CKPTS, ckpt_bytes):
        assert (ck / n).read_bytes() == (blob if n == name else b)
    assert sorted(os.listdir(ck)) == sorted([c[0] for c in CKPTS] + ["checkpoints.tsv"])
    assert {q.get("id") for _, q, _, _ in FakeDrive.log} == {fid}
    ranges = [r for path, q, r, _ in FakeDrive.log if r != "bytes=0-65535"]   # (not the probe)
    if part == "whole":
        assert ranges == [f"bytes={len(blob)}-"], FakeDrive.log
    elif part == "html":
        assert ranges == [None], FakeDrive.log                                # not resumed after the page
        assert "not the start of a torch checkpoint: starting over" in p.stdout
    elif part == "dest-cut":
        assert ranges == ["bytes=70000-"], FakeDrive.log
    elif style == "norange" and downloader == "curl":                        # curl stops (exit 33) ...
        assert ranges == ["bytes=70000-", None], FakeDrive.log                 # ... and the script starts over
        assert "cannot resume" in p.stdout
    else:
        assert ranges == ["bytes=70000-"], FakeDrive.log                       # resumed, not restarted
    if style in ("link", "cookie"):                                           # the cookie went back
        assert all(c and "download_warning_13058" in c for path, q, r, c in FakeDrive.log if "confirm" in q)


# ---------------------------------------------------------------- download.sh against a misbehaving server
CUT = 40_000                                   # where the "cut" fault ends a body


class Mirror(http.server.BaseHTTPRequestHandler):
    """A plain file server with the fault a test picks: an error status (with a body) for every
    request, a HEAD that gives a wrong length, Range ignored, or bodies cut short.  It speaks HTTP/1.0,
    so a body sent without Content-Length ends where the connection closes, and a client cannot tell
    a cut-short one from a whole one."""
    files, fault, log = {}, None, []

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer()

    def do_GET(self):
        self.answer()

    def answer(self):
        rng = self.headers.get("Range")
        self.log.append((self.command, self.path, rng))
        blob = self.files.get(self.path)
        if isinstance(self.fault, int):        # a storage service's refusal: a short XML body
            body = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthorizationFailure</Code>'
                    b'<Message>This request is not authorized.</Message></Error>')
            return self.reply(self.fault, body, {"Content-Type": "application/xml"})
        if blob is None:
            return self.reply(404, b"not found", {})
        if self.command == "HEAD" and self.fault == "head110":
            return self.reply(200, b"", {"Content-Length": "110"})
        if self.fault == "cut":
            return self.reply(200, blob[:CUT], {})
        start = 0
        if rng and self.fault != "norange":
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(blob):
                return self.reply(416, b"", {"Content-Range": f"bytes */{len(blob)}", "Content-Length": "0"})
            return self.reply(206, blob[start:], {"Content-Length": str(len(blob) - start),
                                                  "Content-Range": f"bytes {start}-{len(blob) - 1}/{len(blob)}"})
        self.reply(200, blob, {"Content-Length": str(len(blob))})

    def reply(self, code, body, headers):
        self.send_response(code)
        if code >= 400 and "Content-Length" not in headers:
            headers = {**headers, "Content-Length": str(len(body))}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture
def mirror():
    Mirror.files, Mirror.fault, Mirror.log = {}, None, []
    yield from serving(Mirror)


def gets():
    """The Range header of each GET the mirror saw (None: from the start)."""
    return [r for method, _, r in Mirror.log if method == "GET"]


# download.sh picks curl when there is one; DOWNLOADER forces either client's code path
both_clients = pytest.mark.parametrize("downloader", ["curl", "wget"])


def need(downloader):
    if shutil.which(downloader) is None:
        pytest.skip(f"needs {downloader}")


@both_clients
def test_server_errors_delete_nothing(tmp_path, mirror, ckpt_bytes, downloader):
    need(downloader)
    hub = tmp_path / "th" / "hub" / "checkpoints"
    names = [os.path.basename(f) for f in DINOV2]
    for n, b in zip(names[:3], ckpt_bytes):                   # three whole weights; the fourth is missing
        touch(str(hub / n), b)
    Mirror.files = {f"/dinov2/{f}": b for f, b in zip(DINOV2, ckpt_bytes)}
    env = dict(TORCH_HOME=str(tmp_path / "th"), WEIGHTS="dinov2", PPAP_DINOV2_BASE=f"{mirror}/dinov2",
               DOWNLOADER=downloader)
    Mirror.fault = 403                                        # the size probe gets an error page's length
    p = sh("weights", **env)
    assert p.returncode == 1
    assert sorted(os.listdir(hub)) == sorted(names[:3])       # no error page kept as a .part
    for n, b in zip(names, ckpt_bytes[:3]):
        assert (hub / n).read_bytes() == b
    assert error_lines(p) == [f"error: download failed, HTTP 403 ({mirror}/dinov2/{DINOV2[3]}) -> open that address "
                              f"in a browser to see why, or set PPAP_DINOV2_BASE to a copy that has the file, then "
                              f"run the same command again"]
    Mirror.fault = "head110"                                  # a HEAD that gives a wrong length, a GET that works
    p = sh("weights", **env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(os.listdir(hub)) == sorted(names)
    for n, b in zip(names, ckpt_bytes):
        assert (hub / n).read_bytes() == b
    assert f"keeping {hub}/{names[0]}, a whole torch checkpoint of {len(ckpt_bytes[0])} bytes" in p.stdout
    files, blob = _mirror(tmp_path)                           # an archive kept by --keep-zip, layout incomplete
    data = tmp_path / "data"
    touch(str(data / ".downloads" / "potsdam.zip"), blob)
    Mirror.files, Mirror.fault = {"/potsdam.zip": blob}, 403
    p = sh("potsdam", str(data), "--keep-zip", PPAP_STEGO_MIRROR=mirror, DOWNLOADER=downloader)
    assert p.returncode == 0, p.stdout + p.stderr             # extracted from the archive at hand
    assert (data / ".downloads" / "potsdam.zip").read_bytes() == blob
    assert (data / "potsdam" / "imgs" / "a.mat").read_bytes() == files["imgs/a.mat"]


@both_clients
def test_error_page_is_not_kept_or_resumed(tmp_path, mirror, downloader):
    need(downloader)
    files, blob = _mirror(tmp_path)
    data, dl = tmp_path / "data", tmp_path / "data" / ".downloads"
    page = b"<html><head><title>Service Unavailable</title></head><body>Back soon.</body></html>"
    Mirror.files = {"/potsdam.zip": page}                     # the mirror answers 200 with a page
    p = sh("potsdam", str(data), PPAP_STEGO_MIRROR=mirror, DOWNLOADER=downloader)
    assert p.returncode == 1
    assert not os.listdir(dl)                                 # nothing kept to "resume" once the mirror is back
    assert error_lines(p) == [f'error: potsdam.zip came as an HTML page ("Service Unavailable"), not a zip archive '
                              f'({mirror}/potsdam.zip) -> open that address in a browser to see why, or set '
                              f'PPAP_STEGO_MIRROR to a copy that has the file, then run the same command again']
    Mirror.files = {"/potsdam.zip": blob}                     # the mirror recovers
    # what an older download.sh left: the page kept as the archive, or "resumed" into a .part
    for left, data_was, what in (("potsdam.zip", page, "not a zip archive: fetching it again"),
                                 ("potsdam.zip.part", page + blob[len(page):], "not the start of a zip archive: "
                                                                               "starting over")):
        touch(str(dl / left), data_was)
        Mirror.log = []
        p = sh("potsdam", str(data), PPAP_STEGO_MIRROR=mirror, DOWNLOADER=downloader)
        assert p.returncode == 0, p.stdout + p.stderr
        assert gets() == [None], Mirror.log                   # started over, not resumed after the page
        assert f'[download.sh] {dl}/{left} is an HTML page ("Service Unavailable"), {what}' in p.stdout
        for k, v in files.items():
            assert (data / "potsdam" / k).read_bytes() == v
        assert not os.listdir(dl)
        shutil.rmtree(data / "potsdam")


@both_clients
def test_server_without_range_support_restarts(tmp_path, mirror, downloader):
    need(downloader)
    files, blob = _mirror(tmp_path)
    data = tmp_path / "data"
    Mirror.files, Mirror.fault = {"/potsdam.zip": blob}, "norange"
    touch(str(data / ".downloads" / "potsdam.zip.part"), blob[:len(blob) // 3])   # an interrupted transfer
    p = sh("potsdam", str(data), PPAP_STEGO_MIRROR=mirror, DOWNLOADER=downloader)
    assert p.returncode == 0, p.stdout + p.stderr
    for k, v in files.items():
        assert (data / "potsdam" / k).read_bytes() == v
    if downloader == "curl":                                  # curl refuses the whole file (exit 33) ...
        assert gets() == [f"bytes={len(blob) // 3}-", None], Mirror.log     # ... and the script starts over
        assert "cannot resume" in p.stdout
    else:                                                     # wget takes the whole file it is sent
        assert gets() == [f"bytes={len(blob) // 3}-"], Mirror.log


@both_clients
def test_cut_short_transfer_is_kept_and_resumed(tmp_path, mirror, ckpt_bytes, downloader):
    need(downloader)
    hub = tmp_path / "th" / "hub" / "checkpoints"
    names = [os.path.basename(f) for f in DINOV2]
    for n, b in zip(names[1:], ckpt_bytes[1:]):
        touch(str(hub / n), b)
    Mirror.files, Mirror.fault = {f"/dinov2/{DINOV2[0]}": ckpt_bytes[0]}, "cut"   # no length, closed early
    env = dict(TORCH_HOME=str(tmp_path / "th"), WEIGHTS="dinov2", PPAP_DINOV2_BASE=f"{mirror}/dinov2",
               DOWNLOADER=downloader)
    p = sh("weights", **env)
    part = hub / f"{names[0]}.part"
    assert p.returncode == 1
    assert part.read_bytes() == ckpt_bytes[0][:CUT]
    assert error_lines(p) == [f"error: {part} ends after {CUT} bytes, before the end of its zip: the transfer was "
                              f"cut short ({mirror}/dinov2/{DINOV2[0]}) -> run the same command again to resume"]
    Mirror.fault, Mirror.log = None, []                       # what the advice says: run it again
    p = sh("weights", **env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert gets() == [f"bytes={CUT}-"], Mirror.log
    assert (hub / names[0]).read_bytes() == ckpt_bytes[0]
    assert sorted(os.listdir(hub)) == sorted(names)


def test_imagenet_s_relinks_after_imagenet_moved(tmp_path):
    root = fake_tree(str(tmp_path / "data"), "imagenet-s")
    shutil.rmtree(os.path.join(root, "ImageNetS50", "validation"))
    shutil.rmtree(os.path.join(root, "ImageNetS50", "train-semi"))
    inet = tmp_path / "imagenet"
    touch(str(inet / "val" / "x_validation.JPEG"), b"v")
    touch(str(inet / "train" / "n01443537" / "x_train-semi.JPEG"), b"t")
    assert sh("imagenet-s", "data", cwd=tmp_path, IMAGENET_DIR=str(inet)).returncode == 0
    os.rename(inet, tmp_path / "moved")                       # the links now dangle
    p = sh("imagenet-s", "data", "--check-only", cwd=tmp_path)
    assert p.returncode == 1 and "IMAGENET_DIR=<ImageNet-1k dir> bash download.sh imagenet-s data" in p.stderr
    p = sh("imagenet-s", "data", cwd=tmp_path, IMAGENET_DIR=str(tmp_path / "moved"))   # what that says
    assert p.returncode == 0, p.stdout + p.stderr
    assert "linked 2 images (2 replacing dangling links)" in p.stdout
    img = os.path.join(root, "ImageNetS50", "validation", "n01443537", "x_validation.JPEG")
    assert os.readlink(img) == str(tmp_path / "moved" / "val" / "x_validation.JPEG")
    assert open(img, "rb").read() == b"v"


def test_names_come_from_ppap_registries(tmp_path):
    """The weights download.sh fetches are ppap.py's BACKBONES files, and its dataset targets are the download
    targets of ppap.py's DATASETS: adding a backbone or a dataset is one registry entry."""
    import re
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import ppap
    p = sh("weights", "--dry-run", DOWNLOADER="curl", TORCH_HOME=str(tmp_path / "th"))
    urls = [re.search(r"https://\S+\.pth", ln).group(0) for ln in p.stdout.splitlines() if ln.startswith("+ curl ")]
    assert urls == ppap.released_weights() and len(urls) == 8
    usage = next(ln for ln in sh("--help").stdout.splitlines() if ln.startswith("usage: bash download.sh <"))
    targets = set(usage.split("<")[1].split(">")[0].split("|")) - {"weights", "checkpoints", "all"}
    assert targets == {spec.download for spec in ppap.DATASETS.values() if spec.download}
    # without the project's python the list cannot be read: one line that says what to run
    p = sh("weights", "--dry-run", DOWNLOADER="curl", TORCH_HOME=str(tmp_path / "th"), PYTHON="false")
    assert p.returncode != 0 and "PYTHON=.venv/bin/python bash download.sh weights" in p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1
