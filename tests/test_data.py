"""Real-dataset loaders (issue 5): tiny fake datasets in the exact on-disk layouts."""
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import ppap as D  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

# ---------------------------------------------------------------- independent references

# COCO-Stuff 182 fine ids (0-based as in the stuffthingmaps PNGs), written out per supercategory
# from the COCO-Stuff label list; unused thing ids (street sign, hat, shoe, ...) belong to their
# supercategory too.
COCO_THING_SUPER = {
    'person': [0], 'vehicle': list(range(1, 9)), 'outdoor': list(range(9, 15)),
    'animal': list(range(15, 25)), 'accessory': list(range(25, 33)), 'sports': list(range(33, 43)),
    'kitchen': list(range(43, 51)), 'food': list(range(51, 61)), 'furniture': list(range(61, 71)),
    'electronic': list(range(71, 77)), 'appliance': list(range(77, 83)), 'indoor': list(range(83, 91)),
}
_STUFF = """banner textile; blanket textile; branch plant; bridge building; building-other building;
bush plant; cabinet furniture; cage structural; cardboard rawmaterial; carpet floor;
ceiling-other ceiling; ceiling-tile ceiling; cloth textile; clothes textile; clouds sky;
counter furniture; cupboard furniture; curtain textile; desk-stuff furniture; dirt ground;
door-stuff furniture; fence structural; floor-marble floor; floor-other floor; floor-stone floor;
floor-tile floor; floor-wood floor; flower plant; fog water; food-other food; fruit food;
furniture-other furniture; grass plant; gravel ground; ground-other ground; hill solid;
house building; leaves plant; light furniture; mat textile; metal rawmaterial;
mirror-stuff furniture; moss plant; mountain solid; mud ground; napkin textile; net structural;
paper rawmaterial; pavement ground; pillow textile; plant-other plant; plastic rawmaterial;
platform ground; playingfield ground; railing structural; railroad ground; river water;
road ground; rock solid; roof building; rug textile; salad food; sand ground; sea water;
shelf furniture; sky-other sky; skyscraper building; snow ground; solid-other solid;
stairs furniture; stone solid; straw plant; structural-other structural; table furniture;
tent building; textile-other textile; towel textile; tree plant; vegetable food;
wall-brick wall; wall-concrete wall; wall-other wall; wall-panel wall; wall-stone wall;
wall-tile wall; wall-wood wall; water-other water; waterdrops water; window-blind window;
window-other window; wood solid"""
COCO_STUFF_SUPER = [s.split()[1] for s in _STUFF.replace('\n', ' ').split(';')]
assert len(COCO_STUFF_SUPER) == 91


def coco_reference_map(class_names):
    """fine id -> coarse id, derived from the supercategory table above and the class names
    (things are the first 12 names, stuff the last 15)."""
    names = list(class_names)
    things, stuff = names[:12], names[12:]
    m = {}
    for sup, ids in COCO_THING_SUPER.items():
        for i in ids:
            m[i] = things.index(sup)
    for j, sup in enumerate(COCO_STUFF_SUPER):
        m[91 + j] = 12 + stuff.index(sup)
    return m


def pil_nearest_index(n_in, n_out):
    """Source index of each output pixel under PIL's NEAREST resize: pixel-centre sampling with
    the position accumulated in double precision (reproduces PIL bit for bit)."""
    s = n_in / n_out
    pos, out = 0.5 * s, []
    for _ in range(n_out):
        out.append(int(pos))
        pos += s
    return np.array(out)


def ref_resize_crop(arr, size):
    """numpy [H,W,...] -> shorter side `size` (NEAREST), centre crop size x size."""
    h, w = arr.shape[:2]
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    a = arr[pil_nearest_index(h, nh)][:, pil_nearest_index(w, nw)]
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return a[top:top + size, left:left + size]


def ref_img(arr_uint8):
    return (torch.from_numpy(np.ascontiguousarray(arr_uint8)).permute(2, 0, 1).float() / 255 - MEAN) / STD


def smooth_image(h, w, seed):
    """A smooth RGB image (JPEG-friendly) with a per-image offset so pairs are identifiable."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(3):
        fy, fx, ph = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 6.28)
        chans.append(127 + 100 * np.sin(2 * np.pi * (fy * y / h + fx * x / w) + ph))
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def blocky_labels(h, w, values, seed, block=7):
    rng = np.random.default_rng(seed)
    small = rng.choice(np.asarray(values), size=(h // block + 1, w // block + 1))
    return np.kron(small, np.ones((block, block), dtype=small.dtype))[:h, :w]


def cfg(data, data_dir, **kw):
    c = dict(data=data, data_dir=str(data_dir), img_size=224, val_size=320, num_workers=0, crop_workers=1,
             progress=False)
    c.update(kw)
    return D.Config(**c)


# ---------------------------------------------------------------- fake trees

COCO_SIZES = [(241, 333), (300, 199), (320, 320), (97, 180)]      # (h, w)
COCO_FINE = list(range(182)) + [255]


def make_coco(root, n_train=3, n_val=2):
    base = os.path.join(root, 'cocostuff')
    ids = {'train2017': [f'{i:012d}' for i in range(1, n_train + 1)],
           'val2017': [f'{i:012d}' for i in range(100, 100 + n_val)]}
    for split, lst in ids.items():
        os.makedirs(os.path.join(base, 'images', split))
        os.makedirs(os.path.join(base, 'annotations', split))
        os.makedirs(os.path.join(base, 'curated', split))
        for j, i in enumerate(lst):
            h, w = COCO_SIZES[(j + (split == 'val2017')) % len(COCO_SIZES)]
            Image.fromarray(smooth_image(h, w, int(i))).save(
                os.path.join(base, 'images', split, i + '.jpg'), quality=90)
            Image.fromarray(blocky_labels(h, w, COCO_FINE, int(i)).astype(np.uint8)).save(
                os.path.join(base, 'annotations', split, i + '.png'))
        # an extra image that is not in the curated list must be ignored
        Image.fromarray(smooth_image(50, 60, 7)).save(os.path.join(base, 'images', split, 'extra.jpg'))
    name = {'train2017': 'Coco164kFull_Stuff_Coarse.txt', 'val2017': 'Coco164kFull_Stuff_Coarse_7.txt'}
    for split, lst in ids.items():
        with open(os.path.join(base, 'curated', split, name[split]), 'w') as f:
            f.write('\n'.join(lst) + '\n')
    return ids


CITY_SIZES = [(64, 128), (65, 131), (80, 160)]
CITY_IDS = list(range(34)) + [255]


def make_cityscapes(root):
    base = os.path.join(root, 'cityscapes')
    made = {}
    k = 0
    for split, cities in (('train', ('aachen', 'bochum')), ('val', ('frankfurt',))):
        made[split] = []
        for city in cities:
            os.makedirs(os.path.join(base, 'leftImg8bit', split, city), exist_ok=True)
            os.makedirs(os.path.join(base, 'gtFine', split, city), exist_ok=True)
            for n in range(2):
                h, w = CITY_SIZES[k % len(CITY_SIZES)]
                stem = f'{city}_{n:06d}_000019'
                Image.fromarray(smooth_image(h, w, 1000 + k)).save(
                    os.path.join(base, 'leftImg8bit', split, city, stem + '_leftImg8bit.png'))
                lab = blocky_labels(h, w, CITY_IDS, 1000 + k).astype(np.uint8)
                Image.fromarray(lab).save(os.path.join(base, 'gtFine', split, city, stem + '_gtFine_labelIds.png'))
                # other gtFine files of the official layout must not be picked up
                Image.fromarray(np.zeros((h, w), np.uint8)).save(
                    os.path.join(base, 'gtFine', split, city, stem + '_gtFine_instanceIds.png'))
                made[split].append((stem, k))
                k += 1
    return made


def make_potsdam(root, float_img=True):
    from scipy.io import savemat
    base = os.path.join(root, 'potsdam')
    os.makedirs(os.path.join(base, 'imgs'))
    os.makedirs(os.path.join(base, 'gt'))
    ids = {'labelled_train.txt': ['3_10_0', '3_10_1', '4_11_2'], 'labelled_test.txt': ['2_13_5', '2_14_0']}
    k = 0
    for lst, names in ids.items():
        for n in names:
            rgb = smooth_image(200, 200, 2000 + k)
            ir = np.full((200, 200, 1), 77, np.uint8)
            img = np.concatenate([rgb, ir], -1)
            savemat(os.path.join(base, 'imgs', n + '.mat'),
                    {'img': img.astype(np.float32) / 255 if float_img else img})
            savemat(os.path.join(base, 'gt', n + '.mat'),
                    {'gt': blocky_labels(200, 200, [0, 1, 2, 3, 4, 5, 255], 2000 + k).astype(np.uint8)})
            k += 1
        with open(os.path.join(base, lst), 'w') as f:
            f.write('\n'.join(names) + '\n')
    return ids


def make_imagenet_s(root, n=300):
    base = os.path.join(root, 'imagenet-s', f'ImageNetS{n}')
    wnids = [f'n{10000000 + 7 * i:08d}' for i in range(n)]
    made = []
    for split in ('validation', 'train-semi'):
        for w in wnids:
            os.makedirs(os.path.join(base, split + '-segmentation', w))
            os.makedirs(os.path.join(base, split, w))
        for j, w in enumerate(wnids[:2]):
            stem = f'ILSVRC2012_val_{j:08d}' if split == 'validation' else f'{w}_{j}'
            h, w_ = (90, 120) if j == 0 else (150, 110)
            Image.fromarray(smooth_image(h, w_, 3000 + j)).save(os.path.join(base, split, w, stem + '.JPEG'))
            ids = blocky_labels(h, w_, [0, 1, 255, 256, 300, 1000], 3000 + j)
            rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
            Image.fromarray(rgb).save(os.path.join(base, split + '-segmentation', w, stem + '.png'))
            made.append((split, w, stem, ids))
    return wnids, made


# ---------------------------------------------------------------- label maps

def test_coco_map_matches_supercategory_table():
    assert len(D.COCOSTUFF27_FINE_TO_COARSE) == 182
    assert len(D.COCOSTUFF27_CLASS_NAMES) == 27
    ref = coco_reference_map(D.COCOSTUFF27_CLASS_NAMES)
    for fine in range(182):
        assert D.COCOSTUFF27_FINE_TO_COARSE[fine] == ref[fine], fine
    assert all(0 <= c < 27 for c in D.COCOSTUFF27_FINE_TO_COARSE)
    assert sorted(set(D.COCOSTUFF27_FINE_TO_COARSE)) == list(range(27))
    names = D.COCOSTUFF27_CLASS_NAMES
    for fine, name in ((0, 'person'), (2, 'vehicle'), (16, 'animal'), (156, 'sky'), (168, 'plant'),
                       (148, 'ground'), (172, 'wall'), (101, 'ceiling')):
        assert names[D.COCOSTUFF27_FINE_TO_COARSE[fine]] == name
    assert D.COCOSTUFF27_FINE_TO_COARSE[0] == 9
    lut = D._COCO_LUT
    assert lut[255] == -1 and all(lut[v] == -1 for v in range(182, 256))


def test_cityscapes_and_potsdam_maps():
    assert len(D.CITYSCAPES27_CLASS_NAMES) == 27
    lab = np.array([[0, 6, 7, 8], [26, 33, 34, 255]], np.uint8)
    got = D._apply_lut(D._CITYSCAPES_LUT, lab)
    assert got.tolist() == [[-1, -1, 0, 1], [19, 26, -1, -1]]
    assert D.CITYSCAPES27_CLASS_NAMES[0] == 'road' and D.CITYSCAPES27_CLASS_NAMES[26] == 'bicycle'
    assert D.CITYSCAPES27_CLASS_NAMES[26 - 7] == 'car'
    got = D._apply_lut(D._POTSDAM_LUT, np.array([0, 1, 2, 3, 4, 5, 6, 255]))
    assert got.tolist() == [0, 1, 2, 2, 0, 1, -1, -1]


def test_resize_center_crop_matches_torchvision_and_reference():
    rng = np.random.default_rng(0)
    for h, w in [(241, 333), (333, 241), (320, 320), (97, 180), (500, 321), (199, 640)]:
        for size in (224, 320):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            got = np.asarray(D.resize_center_crop(Image.fromarray(arr), size))
            tv = np.asarray(T.CenterCrop(size)(T.Resize(size, T.InterpolationMode.NEAREST)(Image.fromarray(arr))))
            assert got.shape == (size, size, 3)
            assert np.array_equal(got, tv)
            assert np.array_equal(got, ref_resize_crop(arr, size))
            lab = rng.integers(-1, 300, (h, w))
            got = np.asarray(D.resize_center_crop(D._label_image(lab + 1), size), np.int64) - 1
            assert np.array_equal(got, ref_resize_crop(lab, size))


# ---------------------------------------------------------------- COCO

def test_coco_val_items(tmp_path):
    ids = make_coco(tmp_path)
    ds = D.build_dataset(cfg('cocostuff', tmp_path), 'val')
    assert len(ds) == 2 and ds.n_classes == 27 and list(ds.class_names) == list(D.COCOSTUFF27_CLASS_NAMES)
    ref = coco_reference_map(D.COCOSTUFF27_CLASS_NAMES)
    ref_lut = np.array([ref.get(v, -1) for v in range(256)])
    for j, i in enumerate(ids['val2017']):
        item = ds[j]
        assert set(item) >= {'img', 'label'}
        assert item['img'].dtype == torch.float32 and item['img'].shape == (3, 320, 320)
        assert item['label'].dtype == torch.long and item['label'].shape == (320, 320)
        img = np.asarray(Image.open(tmp_path / 'cocostuff/images/val2017' / f'{i}.jpg').convert('RGB'))
        fine = np.asarray(Image.open(tmp_path / 'cocostuff/annotations/val2017' / f'{i}.png'))
        torch.testing.assert_close(item['img'], ref_img(ref_resize_crop(img, 320)), rtol=0, atol=1e-6)
        assert np.array_equal(item['label'].numpy(), ref_lut[ref_resize_crop(fine, 320)])
        assert (item['label'] == -1).any() and (item['label'] >= 0).any()


def test_coco_train_five_crop(tmp_path):
    ids = make_coco(tmp_path)
    ds = D.build_dataset(cfg('cocostuff', tmp_path), 'train')
    out = D.five_crop_dir(str(tmp_path), 'cocostuff')
    assert out == os.path.join(str(tmp_path), 'cropped', 'cocostuff_five_crop_0.5')
    assert len(ds) == 5 * len(ids['train2017']) and ds.n_classes == 27
    for i, name in enumerate(ids['train2017']):
        img = Image.open(tmp_path / 'cocostuff/images/train2017' / f'{name}.jpg').convert('RGB')
        fine = np.asarray(Image.open(tmp_path / 'cocostuff/annotations/train2017' / f'{name}.png'))
        coarse = torch.from_numpy(D._COCO_LUT[fine])
        h, w = coarse.shape
        tv_imgs = TF.five_crop(img, [h // 2, w // 2])
        tv_labs = TF.five_crop(coarse, [h // 2, w // 2])
        for k in range(5):
            j = 5 * i + k
            stored_lab = np.asarray(Image.open(os.path.join(out, 'label', 'train', f'{j}.png')))
            assert stored_lab.dtype == np.uint8
            assert np.array_equal(stored_lab.astype(np.int64), tv_labs[k].numpy() + 1)   # label + 1, 0 = ignore
            # the authors' crop script saves torchvision's crop with Pillow's default JPEG encoding
            jpg = os.path.join(out, 'img', 'train', f'{j}.jpg')
            buf = io.BytesIO()
            tv_imgs[k].save(buf, format='JPEG')
            assert open(jpg, 'rb').read() == buf.getvalue()
            stored_img = np.asarray(Image.open(jpg), np.float64)
            item = ds[j]
            assert item['img'].shape == (3, 224, 224) and item['label'].shape == (224, 224)
            assert np.array_equal(item['label'].numpy(), ref_resize_crop(tv_labs[k].numpy(), 224))
            torch.testing.assert_close(item['img'], ref_img(ref_resize_crop(stored_img.astype(np.uint8), 224)),
                                       rtol=0, atol=1e-6)


def test_five_crop_boxes_match_torchvision():
    for h, w in [(241, 333), (300, 199), (97, 180), (7, 9), (10, 10), (1024, 2048), (427, 640), (481, 321)]:
        arr = torch.arange(h * w).view(1, h, w)
        tv = TF.five_crop(arr, [h // 2, w // 2])
        for (l, t, r, b), ref in zip(D.five_crop_boxes(w, h), tv):
            assert torch.equal(arr[:, t:b, l:r], ref)


def test_five_crop_multiprocess_equals_single(tmp_path):
    make_coco(tmp_path, n_train=4)
    pairs = D.cocostuff_pairs(str(tmp_path), 'train')
    a = D.build_five_crop('cocostuff', D.read_cocostuff, pairs, str(tmp_path / 'a'), workers=1, progress=False)
    b = D.build_five_crop('cocostuff', D.read_cocostuff, pairs, str(tmp_path / 'b'), workers=2, progress=False)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert len([f for f in files if f.endswith('.jpg')]) == 20
    for f in files:
        assert open(os.path.join(a, f), 'rb').read() == open(os.path.join(b, f), 'rb').read(), f


def test_five_crop_interruption_and_idempotence(tmp_path, monkeypatch):
    make_coco(tmp_path, n_train=3)
    root = str(tmp_path)
    pairs = D.cocostuff_pairs(root, 'train')
    out = D.five_crop_dir(root, 'cocostuff')
    real = D._five_crop_one

    def dies_on_second(task):
        if task[1] == 1:
            raise KeyboardInterrupt('simulated interruption')
        return real(task)

    monkeypatch.setattr(D, '_five_crop_one', dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        D.build_five_crop('cocostuff', D.read_cocostuff, pairs, root, workers=1, progress=False)
    assert not os.path.exists(out)                           # never mistaken for a finished set
    partial = out + '.incomplete'
    first = os.path.join(partial, 'img', 'train', '0.jpg')
    assert os.path.exists(first)
    mtime = os.stat(first).st_mtime_ns
    # a truncated temporary file and a fake DONE.json in the temp folder must not matter
    open(os.path.join(partial, 'img', 'train', '5.jpg.tmp4242'), 'wb').write(b'\xff\xd8garbage')
    open(os.path.join(partial, 'DONE.json'), 'w').write('{}')
    with pytest.raises(D.PPAPError, match="cannot write the five-crop cache"):   # not used as it is either
        monkeypatch.setattr(D, '_five_crop_one', lambda t: (_ for _ in ()).throw(PermissionError()))
        D.build_dataset(cfg('cocostuff', root), 'train')
    monkeypatch.setattr(D, '_five_crop_one', real)
    D.build_five_crop('cocostuff', D.read_cocostuff, pairs, root, workers=1, progress=False)
    assert os.path.isdir(out) and not os.path.exists(partial)
    assert os.stat(os.path.join(out, 'img', 'train', '0.jpg')).st_mtime_ns == mtime   # resumed
    assert sorted(os.listdir(os.path.join(out, 'img', 'train'))) == sorted(f'{j}.jpg' for j in range(15))
    lab5 = np.asarray(Image.open(os.path.join(out, 'label', 'train', '5.png')))
    fine = np.asarray(Image.open(pairs[1][1]))
    ref = TF.five_crop(torch.from_numpy(D._COCO_LUT[fine]), [fine.shape[0] // 2, fine.shape[1] // 2])[0]
    assert np.array_equal(lab5.astype(np.int64), ref.numpy() + 1)

    # idempotent: a second build (and loading the dataset) does no work at all
    def must_not_run(task):
        raise AssertionError('rebuilt a finished five-crop set')
    monkeypatch.setattr(D, '_five_crop_one', must_not_run)
    snapshot = {f: os.stat(os.path.join(out, 'img', 'train', f)).st_mtime_ns
                for f in os.listdir(os.path.join(out, 'img', 'train'))}
    assert D.build_five_crop('cocostuff', D.read_cocostuff, pairs, root, workers=2, progress=False) == out
    ds = D.build_dataset(cfg('cocostuff', root), 'train')
    assert len(ds) == 15
    assert snapshot == {f: os.stat(os.path.join(out, 'img', 'train', f)).st_mtime_ns
                        for f in os.listdir(os.path.join(out, 'img', 'train'))}

    # a finished folder built from another list (or without DONE.json) is rebuilt, not used
    monkeypatch.setattr(D, '_five_crop_one', real)
    D.build_five_crop('cocostuff', D.read_cocostuff, pairs[:2], root, workers=1, progress=False)
    assert len(os.listdir(os.path.join(out, 'img', 'train'))) == 10
    os.remove(os.path.join(out, 'DONE.json'))
    ds = D.build_dataset(cfg('cocostuff', root), 'train')
    assert len(ds) == 15 and len(os.listdir(os.path.join(out, 'img', 'train'))) == 15


# ---------------------------------------------------------------- Cityscapes

def test_cityscapes(tmp_path):
    made = make_cityscapes(tmp_path)
    val = D.build_dataset(cfg('cityscapes', tmp_path), 'val')
    assert val.n_classes == 27 and len(val.class_names) == 27 and len(val) == 2
    for j, (stem, k) in enumerate(sorted(made['val'])):
        img = np.asarray(Image.open(tmp_path / 'cityscapes/leftImg8bit/val/frankfurt' / f'{stem}_leftImg8bit.png'))
        ids = np.asarray(Image.open(tmp_path / 'cityscapes/gtFine/val/frankfurt' / f'{stem}_gtFine_labelIds.png'))
        expect = ids.astype(np.int64) - 7
        expect[(ids < 7) | (ids > 33)] = -1
        item = val[j]
        torch.testing.assert_close(item['img'], ref_img(ref_resize_crop(img, 320)), rtol=0, atol=1e-6)
        assert np.array_equal(item['label'].numpy(), ref_resize_crop(expect, 320))
        assert item['label'].min() == -1 and item['label'].max() <= 26
    train = D.build_dataset(cfg('cityscapes', tmp_path), 'train')
    assert len(train) == 5 * 4
    out = D.five_crop_dir(str(tmp_path), 'cityscapes')
    assert os.path.exists(os.path.join(out, 'label', 'train', '19.png'))
    # sorted order: aachen_0, aachen_1, bochum_0, bochum_1; crop 5*2+4 = centre of bochum_0
    ids = np.asarray(Image.open(tmp_path / 'cityscapes/gtFine/train/bochum/bochum_000000_000019_gtFine_labelIds.png'))
    coarse = torch.from_numpy(D._apply_lut(D._CITYSCAPES_LUT, ids))
    centre = TF.five_crop(coarse, [ids.shape[0] // 2, ids.shape[1] // 2])[4]
    assert np.array_equal(train[14]['label'].numpy(), ref_resize_crop(centre.numpy(), 224))


# ---------------------------------------------------------------- Potsdam

@pytest.mark.parametrize('float_img', [True, False])
def test_potsdam(tmp_path, float_img):
    from scipy.io import loadmat
    ids = make_potsdam(tmp_path, float_img=float_img)
    for split, lst, size in (('train', 'labelled_train.txt', 224), ('val', 'labelled_test.txt', 320)):
        ds = D.build_dataset(cfg('potsdam', tmp_path), split)
        assert ds.n_classes == 3 and len(ds.class_names) == 3 and len(ds) == len(ids[lst])
        for j, name in enumerate(ids[lst]):
            raw = loadmat(tmp_path / 'potsdam/imgs' / f'{name}.mat')['img'][..., :3]
            rgb = np.rint(raw * 255).astype(np.uint8) if float_img else raw
            gt = loadmat(tmp_path / 'potsdam/gt' / f'{name}.mat')['gt']
            merged = np.select([np.isin(gt, [0, 4]), np.isin(gt, [1, 5]), np.isin(gt, [2, 3])], [0, 1, 2], -1)
            item = ds[j]
            assert item['img'].shape == (3, size, size)
            torch.testing.assert_close(item['img'], ref_img(ref_resize_crop(rgb, size)), rtol=0, atol=1e-6)
            assert np.array_equal(item['label'].numpy(), ref_resize_crop(merged, size))
    assert not os.path.exists(os.path.join(str(tmp_path), 'cropped'))     # Potsdam is not five-cropped


# ---------------------------------------------------------------- ImageNet-S

def test_imagenet_s(tmp_path):
    wnids, made = make_imagenet_s(tmp_path, n=300)
    ds = D.build_dataset(cfg('imagenet-s', tmp_path, imagenet_s_classes=300), 'val')
    assert ds.n_classes == 301 and ds.class_names[0] == 'background' and ds.class_names[1:] == wnids
    assert len(ds) == 2
    for j, (split, w, stem, ids) in enumerate([m for m in made if m[0] == 'validation']):
        img = np.asarray(Image.open(tmp_path / 'imagenet-s/ImageNetS300/validation' / w / f'{stem}.JPEG').convert('RGB'))
        expect = np.where(ids == 1000, -1, ids)
        item = ds[j]
        torch.testing.assert_close(item['img'], ref_img(ref_resize_crop(img, 320)), rtol=0, atol=1e-6)
        assert np.array_equal(item['label'].numpy(), ref_resize_crop(expect, 320))
        assert set(np.unique(item['label'].numpy())) <= {-1, 0, 1, 255, 256, 300}
    train = D.build_dataset(cfg('imagenet-s', tmp_path, imagenet_s_classes=300), 'train')
    assert len(train) == 2 and train[0]['img'].shape == (3, 224, 224)
    with pytest.raises(D.PPAPError, match='ImageNetS50/validation-segmentation — run: bash download.sh imagenet-s'):
        D.build_dataset(cfg('imagenet-s', tmp_path), 'val')   # 'imagenet-s' = ImageNet-S50
    for w in wnids[:3]:
        os.makedirs(tmp_path / 'imagenet-s/ImageNetS50/validation-segmentation' / w)
        os.makedirs(tmp_path / 'imagenet-s/ImageNetS50/validation' / w)
    with pytest.raises(D.PPAPError, match='has 3 class folders, expected 50'):
        D.build_dataset(cfg('imagenet-s', tmp_path), 'val')


# ---------------------------------------------------------------- layout errors

@pytest.mark.parametrize('name,make,remove', [
    ('cocostuff', make_coco, 'cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt'),
    ('cocostuff', make_coco, 'cocostuff/annotations/val2017'),
    ('cityscapes', make_cityscapes, 'cityscapes/gtFine/val'),
    ('potsdam', make_potsdam, 'potsdam/labelled_test.txt'),
    ('imagenet-s', lambda r: make_imagenet_s(r, n=50), 'imagenet-s/ImageNetS50/validation'),
])
def test_missing_layout_errors(tmp_path, monkeypatch, name, make, remove):
    import shutil
    make(tmp_path / 'data')
    monkeypatch.chdir(tmp_path)
    data_dir = 'data'                                      # messages repeat the --data-dir given
    target = os.path.join('data', remove)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    with pytest.raises(D.PPAPError) as e:
        D.build_dataset(cfg(name, data_dir), 'val')
    msg = str(e.value)
    assert '\n' not in msg
    assert msg.startswith(f'missing {os.path.join(data_dir, remove)} — run: bash download.sh {name} {data_dir}')


def test_unknown_split_and_dataset(tmp_path):
    with pytest.raises(D.PPAPError):
        D.build_dataset(cfg('cocostuff', tmp_path), 'test')
    with pytest.raises(D.PPAPError):
        D.build_dataset(cfg('imagenet-s77', tmp_path), 'val')


def test_missing_listed_file_errors(tmp_path, monkeypatch):
    ids = make_coco(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    os.remove(f"data/cocostuff/annotations/val2017/{ids['val2017'][1]}.png")
    ds = D.build_dataset(cfg("cocostuff", "data"), "val")
    ds[0]
    with pytest.raises(D.PPAPError, match=f"^missing data/cocostuff/annotations/val2017/{ids['val2017'][1]}.png"
                                          " — run: bash download.sh cocostuff data$"):
        ds[1]
    os.remove(f"data/cocostuff/images/train2017/{ids['train2017'][2]}.jpg")
    for workers in (1, 2):
        with pytest.raises(D.PPAPError, match=f"^missing data/cocostuff/images/train2017/{ids['train2017'][2]}.jpg"
                                              " — run: bash download.sh cocostuff data$"):
            D.build_dataset(cfg("cocostuff", "data", crop_workers=workers), "train")
    assert not os.path.exists("data/cropped/cocostuff_five_crop_0.5")


# ---------------------------------------------------------------- through ppap.py's Config and CLI

def test_build_dataset_with_config(tmp_path):
    make_potsdam(tmp_path)
    c = D.make_config({"data": "potsdam", "data_dir": str(tmp_path)})
    ds = D.build_dataset(c, "val")
    assert ds.n_classes == 3 and ds[0]["img"].shape == (3, c.val_size, c.val_size)


def _cli(tmp_path, *extra):
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PPAP_DATA"}
    return subprocess.run([sys.executable, os.path.join(repo, "ppap.py"), "--data", "cocostuff",
                           "--data-dir", "data", "--max-steps", "2", "--batch-size", "2", "--arch", "vit_tiny_demo",
                           "--device", "cpu", "--num-workers", "0", "--no-progress", "--run", "run", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_cli_trains_on_fake_cocostuff(tmp_path):
    make_coco(tmp_path / "data", n_train=2, n_val=1)
    p = _cli(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "train 10 images (224px), val 1 images (320px), 27 classes" in p.stdout
    assert os.path.exists(tmp_path / "run" / "last.pt")
    assert os.path.exists(tmp_path / "data" / "cropped" / "cocostuff_five_crop_0.5" / "DONE.json")


def test_cli_missing_folder_message(tmp_path, monkeypatch, capsys):
    """In-process (same code path as `python ppap.py ...`, without another torch start-up)."""
    import shutil
    make_coco(tmp_path / "data", n_train=2, n_val=1)
    monkeypatch.chdir(tmp_path)
    argv = ["--data", "cocostuff", "--data-dir", "data", "--max-steps", "2", "--batch-size", "2",
            "--arch", "vit_tiny_demo", "--device", "cpu", "--num-workers", "0", "--no-progress", "--run", "run"]
    os.remove("data/cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt")
    assert D.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: missing data/cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"
        " — run: bash download.sh cocostuff data")
    shutil.rmtree("data/cocostuff")
    assert D.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: missing data/cocostuff/images/train2017 — run: bash download.sh cocostuff data")


def test_damaged_five_crop_set_message(tmp_path):
    make_coco(tmp_path, n_train=1)
    ds = D.build_dataset(cfg("cocostuff", tmp_path), "train")
    out = D.five_crop_dir(str(tmp_path), "cocostuff")
    os.remove(os.path.join(out, "img", "train", "3.jpg"))
    with pytest.raises(D.PPAPError, match=f"delete {out} to rebuild"):
        ds[3]


def _jpeg_encoding(path):
    from PIL import JpegImagePlugin
    im = Image.open(path)
    return im.quantization, JpegImagePlugin.get_sampling(im)


def test_five_crop_jpegs_use_pillows_default_encoding_and_old_caches_are_rebuilt(tmp_path):
    """The authors' (and STEGO's) crop scripts save with Pillow's defaults: quality 75, 4:2:0 chroma.
    A cache built with another encoding (our version 1: quality 95, 4:4:4) is rebuilt, not reused."""
    make_coco(tmp_path, n_train=1)
    pairs = D.cocostuff_pairs(str(tmp_path), 'train')
    out = D.build_five_crop('cocostuff', D.read_cocostuff, pairs, str(tmp_path), workers=1, progress=False)
    ref = io.BytesIO()
    Image.new('RGB', (64, 48), (90, 120, 30)).save(ref, format='JPEG')
    default_tables, default_sampling = _jpeg_encoding(ref)
    assert default_sampling == 2                                          # 4:2:0
    for j in range(5):
        assert _jpeg_encoding(os.path.join(out, 'img', 'train', f'{j}.jpg')) == (default_tables, 2)
    # an old cache (version 1 manifest): rebuilt with the default encoding
    manifest = json.load(open(os.path.join(out, 'DONE.json')))
    old = {**manifest, 'version': 1, 'jpeg_quality': 95}
    old.pop('jpeg')
    json.dump(old, open(os.path.join(out, 'DONE.json'), 'w'))
    Image.new('RGB', (8, 8)).save(os.path.join(out, 'img', 'train', '0.jpg'), format='JPEG', quality=95,
                                  subsampling=0)
    D.build_five_crop('cocostuff', D.read_cocostuff, pairs, str(tmp_path), workers=1, progress=False)
    assert json.load(open(os.path.join(out, 'DONE.json'))) == manifest
    assert _jpeg_encoding(os.path.join(out, 'img', 'train', '0.jpg')) == (default_tables, 2)
    # higher quality is opt-in, in a folder of its own
    hq = D.build_five_crop('cocostuff', D.read_cocostuff, pairs, str(tmp_path), workers=1, progress=False, quality=95)
    assert hq.endswith('cocostuff_five_crop_0.5_q95') and hq != out
    tables, sampling = _jpeg_encoding(os.path.join(hq, 'img', 'train', '0.jpg'))
    assert sampling == 0 and tables != default_tables                    # 4:4:4, other tables


def test_five_crop_jpegs_do_not_inherit_the_sources_jpeg_comment(tmp_path):
    """The authors' crop script saves Image.fromarray(crop array): no metadata. A source JPEG with a comment
    segment (COM) gives crops with the bytes of its pixels alone, not the comment Pillow would carry over."""
    ids = make_coco(tmp_path, n_train=1)
    src = tmp_path / 'cocostuff' / 'images' / 'train2017' / f"{ids['train2017'][0]}.jpg"
    rgb = Image.open(src).convert('RGB')
    rgb.save(src, format='JPEG', quality=90, comment=b'a camera wrote this')
    assert Image.open(src).info['comment'] == b'a camera wrote this'
    pairs = D.cocostuff_pairs(str(tmp_path), 'train')
    out = D.build_five_crop('cocostuff', D.read_cocostuff, pairs, str(tmp_path), workers=1, progress=False)
    decoded = Image.open(src).convert('RGB')
    for k, box in enumerate(D.five_crop_boxes(decoded.width, decoded.height)):
        data = open(os.path.join(out, 'img', 'train', f'{k}.jpg'), 'rb').read()
        ref = io.BytesIO()
        Image.fromarray(np.asarray(decoded)[box[1]:box[3], box[0]:box[2]]).save(ref, format='JPEG')
        assert b'a camera wrote this' not in data and data == ref.getvalue()


def _authors_crop_set(root, pairs, read):
    """A five-crop set as the authors' crop script writes it (STEGO's layout under the dataset's data_path, their
    name cocostuff27): torchvision's five_crop of the loaded tensors, back to uint8 as they do (x255 + 0.5,
    clamped), saved with Image.fromarray; labels + 1 in an 8-bit PNG."""
    out = os.path.join(root, 'cocostuff', 'cropped', 'cocostuff27_five_crop_0.5')
    for sub in ('img', 'label'):
        os.makedirs(os.path.join(out, sub, 'train'))
    for i, (ip, lp) in enumerate(pairs):
        img, lab = read(ip, lp)
        x = TF.to_tensor(img)
        h, w = x.shape[-2:]
        crops = TF.five_crop(x, [int(h * 0.5), int(w * 0.5)])
        labs = TF.five_crop(torch.from_numpy(lab), [int(h * 0.5), int(w * 0.5)])
        for k, (c, l) in enumerate(zip(crops, labs)):
            arr = c.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
            Image.fromarray(arr).save(os.path.join(out, 'img', 'train', f'{5 * i + k}.jpg'), 'JPEG')
            Image.fromarray((l + 1).to(torch.uint8).numpy()).save(os.path.join(out, 'label', 'train',
                                                                               f'{5 * i + k}.png'), 'PNG')
    return out


def test_the_authors_crop_set_is_used_when_present_and_equals_ours(tmp_path, capsys):
    make_coco(tmp_path, n_train=2)
    pairs = D.cocostuff_pairs(str(tmp_path), 'train')
    theirs = _authors_crop_set(str(tmp_path), pairs, D.read_cocostuff)
    ours = D.build_five_crop('cocostuff', D.read_cocostuff, pairs, str(tmp_path / 'own'), workers=1, progress=False)
    for j in range(10):                          # byte for byte: the same pixels, encoding and (no) metadata
        for sub, ext in (('img', 'jpg'), ('label', 'png')):
            a, b = (os.path.join(d, sub, 'train', f'{j}.{ext}') for d in (theirs, ours))
            if ext == 'jpg':
                assert open(a, 'rb').read() == open(b, 'rb').read(), j
            else:
                assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), j
    ds = D.build_dataset(cfg('cocostuff', tmp_path), 'train')
    assert f"using the authors' crop set {theirs} (10 crops" in capsys.readouterr().out
    assert ds.pairs[7][0] == os.path.join(theirs, 'img', 'train', '7.jpg') and len(ds) == 10
    assert not os.path.exists(D.five_crop_dir(str(tmp_path), 'cocostuff'))          # ours was not built
    # an incomplete set of theirs is left alone: ours is built
    os.remove(os.path.join(theirs, 'label', 'train', '9.png'))
    ds = D.build_dataset(cfg('cocostuff', tmp_path), 'train')
    assert "authors' crop set" not in capsys.readouterr().out
    assert ds.pairs[7][0] == os.path.join(D.five_crop_dir(str(tmp_path), 'cocostuff'), 'img', 'train', '7.jpg')


# ---------------------------------------------------------------- the unhappy path

def test_a_val_label_of_the_wrong_size_is_an_error(tmp_path):
    ids = make_coco(tmp_path, n_train=1, n_val=1)
    lab = tmp_path / 'cocostuff' / 'annotations' / 'val2017' / f"{ids['val2017'][0]}.png"
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(lab)
    ds = D.build_dataset(cfg('cocostuff', tmp_path), 'val')
    with pytest.raises(D.PPAPError, match=r"label .* is 30x40 but image .* is \d+x\d+"):
        ds[0]


def test_an_rgb_label_is_named_as_such(tmp_path):
    ids = make_coco(tmp_path, n_train=1, n_val=1)
    lab = tmp_path / 'cocostuff' / 'annotations' / 'val2017' / f"{ids['val2017'][0]}.png"
    h, w = np.asarray(Image.open(lab)).shape
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(lab)
    with pytest.raises(D.PPAPError, match=r"has 3 channels \(an RGB picture\?\)"):
        D.build_dataset(cfg('cocostuff', tmp_path), 'val')[0]


def test_truncated_and_undecodable_images_name_the_file(tmp_path):
    ids = make_coco(tmp_path, n_train=1, n_val=2)
    img = tmp_path / 'cocostuff' / 'images' / 'val2017' / f"{ids['val2017'][0]}.jpg"
    img.write_bytes(img.read_bytes()[:300])
    ds = D.build_dataset(cfg('cocostuff', tmp_path), 'val')
    # the advice leads somewhere: download.sh sees the deleted file missing and restores it (a damaged file it
    # would call complete)
    advice = f" — delete it, then run: bash download.sh cocostuff {tmp_path} \\(it restores missing files\\)$"
    with pytest.raises(D.PPAPError, match=f"^cannot read {img}: .*{advice}"):
        ds[0]
    # a truncated source image of the train split: the five-crop build names it too
    src = tmp_path / 'cocostuff' / 'images' / 'train2017' / f"{ids['train2017'][0]}.jpg"
    whole = src.read_bytes()
    src.write_bytes(whole[:300])
    with pytest.raises(D.PPAPError, match=f"^cannot read {src}: .*{advice}"):
        D.build_dataset(cfg('cocostuff', tmp_path), 'train')
    # a damaged five-crop file: rebuild the set, the sources are fine
    src.write_bytes(whole)
    ds = D.build_dataset(cfg('cocostuff', tmp_path), 'train')
    crop = tmp_path / 'cropped' / 'cocostuff_five_crop_0.5' / 'img' / 'train' / '2.jpg'
    crop.write_bytes(crop.read_bytes()[:200])
    with pytest.raises(D.PPAPError, match=f"^cannot read {crop}: .* — delete .*cocostuff_five_crop_0.5 to rebuild"):
        ds[2]


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    grey = (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)        # up to 64491 of 65535
    p = tmp_path / 'g16.png'
    Image.fromarray(grey).save(p)
    assert Image.open(p).mode.startswith('I')
    rgb = np.asarray(D.open_rgb(p))
    assert rgb.shape == (48, 64, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    np.testing.assert_array_equal(rgb[..., 0], np.clip(np.rint(grey * (255 / 65535)), 0, 255).astype(np.uint8))
    assert 0 < rgb.mean() < 255                                               # not all white


def test_a_replaced_source_label_rebuilds_its_crops(tmp_path):
    ids = make_coco(tmp_path, n_train=1)
    ds = D.build_dataset(cfg('cocostuff', tmp_path), 'train')
    lab = tmp_path / 'cocostuff' / 'annotations' / 'train2017' / f"{ids['train2017'][0]}.png"
    fine = np.asarray(Image.open(lab))
    Image.fromarray(np.full_like(fine, 95)).save(lab)                           # fine 95 -> coarse 20
    os.utime(lab, ns=(1, 1))                                                   # even with an old timestamp
    ds = D.build_dataset(cfg('cocostuff', tmp_path), 'train')
    assert (ds[0]['label'] == int(D._COCO_LUT[95])).all()


def test_a_read_only_data_dir_without_a_crop_cache_is_one_line(tmp_path, monkeypatch):
    make_coco(tmp_path, n_train=1)
    real = os.makedirs

    def read_only(path, *a, **kw):
        if 'cropped' in str(path):
            raise PermissionError(13, 'Permission denied', str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(os, 'makedirs', read_only)
    with pytest.raises(D.PPAPError, match=r'cannot create the five-crop cache .* \(Permission denied\); .* writable'):
        D.build_dataset(cfg('cocostuff', tmp_path), 'train')


def test_sixteen_bit_potsdam_images_are_scaled_not_clipped(tmp_path):
    rgb16 = (np.arange(32 * 40 * 3).reshape(32, 40, 3) * 17 % 65536).astype(np.uint16)
    img = np.concatenate([rgb16, np.full((32, 40, 1), 999, np.uint16)], -1)      # + infrared
    out = np.asarray(D._potsdam_image(img))
    np.testing.assert_array_equal(out, np.clip(np.rint(rgb16 * (255 / 65535)), 0, 255).astype(np.uint8))
    assert 0 < out.mean() < 250                                                   # not all white


def test_a_list_that_names_an_id_twice_counts_it_once(tmp_path, capsys):
    ids = make_coco(tmp_path, n_train=2, n_val=3)
    lst = tmp_path / 'cocostuff' / 'curated' / 'val2017' / 'Coco164kFull_Stuff_Coarse_7.txt'
    lst.write_text('\n'.join(ids['val2017'] + ids['val2017'][:2]) + '\n')
    ds = D.build_dataset(cfg('cocostuff', tmp_path), 'val')
    assert len(ds) == 3 and "lists 2 id(s) twice" in capsys.readouterr().err


def test_a_copied_data_dir_keeps_its_five_crop_set(tmp_path):
    """cp -r gives every file a new modification time; the crops of unchanged sources are kept (a replaced
    source is caught by its size, see test_a_replaced_source_label_rebuilds_its_crops)."""
    make_coco(tmp_path, n_train=2)
    D.build_dataset(cfg('cocostuff', tmp_path), 'train')
    out = D.five_crop_dir(str(tmp_path), 'cocostuff')
    snapshot = {f: os.stat(os.path.join(out, 'img', 'train', f)).st_mtime_ns for f in os.listdir(os.path.join(out, 'img', 'train'))}
    for root, _, files in os.walk(tmp_path / 'cocostuff'):
        for f in files:
            os.utime(os.path.join(root, f), ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    D.build_dataset(cfg('cocostuff', tmp_path), 'train')
    assert snapshot == {f: os.stat(os.path.join(out, 'img', 'train', f)).st_mtime_ns for f in snapshot}


def test_a_full_disk_on_a_five_crop_rerun_is_one_line(tmp_path, monkeypatch):
    make_coco(tmp_path, n_train=1)
    real = D.atomic_write

    def full(path, write):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(D, 'atomic_write', full)
    for attempt in range(2):                       # the rerun meets a disk that is still full
        with pytest.raises(D.PPAPError, match='cannot write the five-crop cache .*No space left on device'):
            D.build_dataset(cfg('cocostuff', tmp_path), 'train')
    monkeypatch.setattr(D, 'atomic_write', real)
    assert len(D.build_dataset(cfg('cocostuff', tmp_path), 'train')) == 5
