"""Research datasets in their real on-disk formats, built tiny here: CIFAR-10's python archive (pickles in the official
structure), CelebA-like JPEGs, FFHQ-like PNGs, an ImageNet-like class-folder tree; the papers' preprocessing against
transcriptions with direct PIL calls; safe unpickling; verified atomic downloads (no network); the memory check."""
import hashlib, io, os, pickle, tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sadm_lab import data as D
from sadm_lab.core import ConfigError, DataError
from sadm_lab.data import (load_data, load_image, center_crop_arr, celeba_crop, celeba_crop_140, ffhq_resize,
                           safe_unpickle, UnsafePickleError, download_file, check_memory, CIFAR10_BATCHES)


def unit(a: np.ndarray) -> torch.Tensor:
    "uint8 -> [-1, 1] as x / 127.5 - 1, computed here in numpy float32 (the same two rounded float32 operations)."
    return torch.from_numpy(a.astype(np.float32) / np.float32(127.5) - np.float32(1))


# ---------------------------------------------------------------- CIFAR-10
def write_cifar(folder: Path, n_train=3, n_test=2, seed=0) -> dict:
    "The official python layout: data_batch_1..5, test_batch (dicts with bytes keys), batches.meta."
    folder.mkdir(parents=True, exist_ok=True)
    rng, out = np.random.default_rng(seed), {}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        k = n_test if name == 'test_batch' else n_train
        d = {b'batch_label': f'{name} of 5'.encode(), b'labels': rng.integers(0, 10, k).tolist(),
             b'data': rng.integers(0, 256, (k, 3072), dtype=np.uint8),
             b'filenames': [f'img{i}.png'.encode() for i in range(k)]}
        (folder/name).write_bytes(pickle.dumps(d))
        out[name] = d
    names = [b'airplane', b'automobile', b'bird', b'cat', b'deer', b'dog', b'frog', b'horse', b'ship', b'truck']
    (folder/'batches.meta').write_bytes(pickle.dumps({b'num_cases_per_batch': n_train, b'label_names': names,
                                                      b'num_vis': 3072}))
    return out

def cifar_archive(tmp: Path) -> tuple[Path, dict]:
    raw = write_cifar(tmp/'src'/'cifar-10-batches-py')
    arc = tmp/'cifar-10-python.tar.gz'
    with tarfile.open(arc, 'w:gz') as t: t.add(tmp/'src'/'cifar-10-batches-py', arcname='cifar-10-batches-py')
    return arc, raw

@pytest.mark.parametrize('layout', ['archive-file', 'archive-in-folder', 'extracted-parent', 'extracted-folder'])
def test_cifar10_layouts_pixels_labels_names(tmp_path, layout):
    arc, raw = cifar_archive(tmp_path)
    root = {'archive-file': arc, 'archive-in-folder': tmp_path, 'extracted-parent': tmp_path/'src',
            'extracted-folder': tmp_path/'src'/'cifar-10-batches-py'}[layout]
    if layout == 'archive-in-folder': (tmp_path/'src').rename(tmp_path/'moved')   # only the archive is there
    tr, te = load_data('cifar10', root=root), load_data('cifar10', root=root, split='test')
    assert (tr.name, tr.split, tr.num_classes, te.split) == ('cifar10', 'train', 10, 'test')
    assert tr.class_names == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    assert tr.images.shape == (15, 3, 32, 32) and te.images.shape == (2, 3, 32, 32)
    assert tr.images.dtype == torch.float32 and tr.labels.dtype == torch.int64
    # each row: 1024 R then 1024 G then 1024 B values, row-major 32x32
    x = np.concatenate([raw[f'data_batch_{i}'][b'data'] for i in range(1, 6)])
    ref = np.stack([x[:, :1024], x[:, 1024:2048], x[:, 2048:]], 1).reshape(-1, 3, 32, 32)
    assert torch.equal(tr.images, unit(ref))
    assert tr.images[4, 2, 31, 0] == unit(raw['data_batch_2'][b'data'][1, 2048 + 31 * 32:2048 + 31 * 32 + 1])[0]
    assert tr.labels.tolist() == sum((raw[f'data_batch_{i}'][b'labels'] for i in range(1, 6)), [])
    assert te.labels.tolist() == raw['test_batch'][b'labels']
    assert torch.equal(te.images, unit(raw['test_batch'][b'data'].reshape(-1, 3, 32, 32)))
    al = load_data('cifar10', root=root, split='all', max_images=7)
    assert len(al) == 7 and al.split == 'all'

def test_cifar10_through_the_config(tmp_path):
    from sadm_lab.config import get_config
    from sadm_lab.train import build_data
    arc, raw = cifar_archive(tmp_path)
    cfg = get_config('smoke', ['data.name=cifar10', f'data.root={arc}'])
    d = build_data(cfg)
    assert (d.name, len(d), d.resolution, d.channels, d.num_classes) == ('cifar10', 15, 32, 3, 10)
    t = build_data(cfg, 'test')
    assert t.labels.tolist() == raw['test_batch'][b'labels']
    small = build_data(get_config('smoke', ['data.name=cifar10', f'data.root={arc}', 'data.resolution=16']))
    assert small.images.shape == (15, 3, 16, 16)

def test_cifar10_python2_style_pickle_with_str_keys(tmp_path):
    "The official files come from Python 2: keys load as str with latin1; both key kinds are accepted."
    folder = tmp_path/'cifar-10-batches-py'
    write_cifar(folder)
    d = pickle.loads((folder/'test_batch').read_bytes())
    (folder/'test_batch').write_bytes(pickle.dumps({k.decode(): v for k, v in d.items()}))
    assert load_data('cifar10', root=tmp_path, split='test').labels.tolist() == d[b'labels']

class Evil:
    def __reduce__(self): return (os.system, ('echo SHOULD-NOT-RUN > /dev/null',))

def test_unsafe_pickle_is_refused_before_it_runs(tmp_path, monkeypatch):
    payload, batch = pickle.dumps(Evil()), pickle.dumps({b'data': Evil(), b'labels': [1]})
    called = []
    monkeypatch.setattr(os, 'system', lambda *a: called.append(a))   # had it run, we would see it here
    with pytest.raises(UnsafePickleError, match=r'refused to load (posix|os)\.system'): safe_unpickle(payload)
    folder = tmp_path/'cifar-10-batches-py'
    write_cifar(folder)
    (folder/'data_batch_3').write_bytes(batch)
    with pytest.raises(UnsafePickleError, match='data_batch_3'): load_data('cifar10', root=tmp_path)
    for other in (pickle.dumps(eval), pickle.dumps(io.BytesIO)):
        with pytest.raises(UnsafePickleError): safe_unpickle(other)
    assert called == []
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(safe_unpickle(pickle.dumps({b'a': arr, 'b': [1, 'x', b'y']}))[b'a'], arr)

def test_cifar10_bad_input_one_clear_error(tmp_path):
    with pytest.raises(DataError, match='CIFAR-10 not found.*cs.toronto.edu'): load_data('cifar10', root=tmp_path)
    folder = tmp_path/'cifar-10-batches-py'
    write_cifar(folder)
    (folder/'data_batch_5').unlink()
    with pytest.raises(DataError, match='data_batch_5 is missing'): load_data('cifar10', root=tmp_path)
    (tmp_path/'wrong.tar.gz').write_bytes(b'not a tar at all')
    with pytest.raises(DataError, match='not a tar archive'): load_data('cifar10', root=tmp_path/'wrong.tar.gz')
    other = tmp_path/'other.tar.gz'
    with tarfile.open(other, 'w:gz') as t: t.add(folder/'batches.meta', arcname='cifar-10-batches-bin/batches.meta')
    with pytest.raises(DataError, match='not the CIFAR-10 python archive'): load_data('cifar10', root=other)
    (folder/'data_batch_5').write_bytes(pickle.dumps({b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]}))
    with pytest.raises(DataError, match=r'uint8 array \(N, 3072\)'): load_data('cifar10', root=tmp_path)
    (folder/'data_batch_5').write_bytes(b'\x80\x04garbage')
    with pytest.raises(DataError, match='not a readable pickle'): load_data('cifar10', root=tmp_path)


# ---------------------------------------------------------------- downloads (no network)
class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, fail_after: int | None = None):
        super().__init__(data); self.headers = {'Content-Length': str(len(data))}; self.fail_after = fail_after
    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after: raise ConnectionResetError('cut')
        return super().read(n)

def test_download_file_url_and_checksums(tmp_path):
    blob = np.random.default_rng(0).bytes(5000)
    (tmp_path/'server.bin').write_bytes(blob)
    url = (tmp_path/'server.bin').as_uri()
    got = download_file(url, tmp_path/'dl'/'a.bin', md5=hashlib.md5(blob).hexdigest(),
                        sha256=hashlib.sha256(blob).hexdigest(), chunk=1000, progress=False)
    assert got == tmp_path/'dl'/'a.bin' and got.read_bytes() == blob
    with pytest.raises(DataError, match='checksum mismatch.*deleted.*not written'):
        download_file(url, tmp_path/'dl'/'b.bin', md5='0' * 32, progress=False)
    with pytest.raises(DataError, match='sha256'):
        download_file(url, tmp_path/'dl'/'c.bin', sha256='f' * 64, progress=False)
    with pytest.raises(DataError, match='ConnectionResetError.*partial file was deleted'):
        download_file('https://example.invalid/x', tmp_path/'dl'/'d.bin', progress=False, chunk=100,
                      opener=lambda url: FakeResponse(blob, fail_after=1000))
    assert sorted(p.name for p in (tmp_path/'dl').iterdir()) == ['a.bin']   # nothing half-written, no temp files

def test_cifar10_download_is_opt_in_and_verified(tmp_path, monkeypatch):
    arc, raw = cifar_archive(tmp_path/'server')
    payload, served = arc.read_bytes(), []
    def opener(url):
        served.append(url); return FakeResponse(payload)
    real = D.download_file
    monkeypatch.setattr(D, 'download_file',
                        lambda url, dest, **kw: real(url, dest, opener=opener, progress=False, **kw))
    with pytest.raises(DataError, match='not found'): load_data('cifar10', root=tmp_path/'cache')
    assert served == []                                   # download=False never touches the network
    with pytest.raises(DataError, match='checksum mismatch'):   # our fake archive is not the published one
        load_data('cifar10', root=tmp_path/'cache', download=True)
    assert served == [D.CIFAR10_URL] and not list((tmp_path/'cache').iterdir())
    monkeypatch.setattr(D, 'CIFAR10_MD5', hashlib.md5(payload).hexdigest())
    d = load_data('cifar10', root=tmp_path/'cache', download=True, split='test')
    assert (tmp_path/'cache'/'cifar-10-python.tar.gz').read_bytes() == payload
    assert d.labels.tolist() == raw['test_batch'][b'labels']
    load_data('cifar10', root=tmp_path/'cache', download=True)
    assert len(served) == 2                               # already there: not fetched again


# ---------------------------------------------------------------- preprocessing conventions
def adm_reference(im: Image.Image, s: int) -> np.ndarray:
    "guided-diffusion image_datasets.py center_crop_arr, transcribed (Image.BOX / Image.BICUBIC constants)."
    while min(*im.size) >= 2 * s:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
    scale = s / min(*im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
    arr = np.array(im)
    y, x = (arr.shape[0] - s) // 2, (arr.shape[1] - s) // 2
    return arr[y:y + s, x:x + s]

@pytest.mark.parametrize('hw,s', [((375, 500), 64), ((500, 333), 32), ((64, 64), 64), ((50, 90), 64), ((301, 257), 16)])
def test_center_crop_arr_matches_adm(hw, s):
    a = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    out = center_crop_arr(Image.fromarray(a), s)
    assert out.shape == (s, s, 3) and out.dtype == np.uint8
    assert np.array_equal(out, adm_reference(Image.fromarray(a), s))
    if hw == (s, s): assert np.array_equal(out, a)        # already the right size: unchanged

def test_center_crop_arr_box_steps_are_2x2_means():
    "An image made of constant 2x2 blocks halves exactly (BOX = block mean), independent of PIL's resize code."
    small = np.random.default_rng(1).integers(0, 256, (40, 60), dtype=np.uint8)
    big = small.repeat(2, 0).repeat(2, 1)                 # 80x120 -> BOX halving gives `small` back, 40 >= 2*20 no
    out = center_crop_arr(Image.fromarray(big), 40)      # 80 >= 80: one halving to 60x40, then no-op bicubic
    assert np.array_equal(out, small[:, 10:50])

def test_celeba_crops_match_ddim_uvit_and_score_sde():
    a = np.random.default_rng(2).integers(0, 256, (218, 178, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    cx, cy = 89, 121                                      # DDIM / U-ViT: F.crop(img, cy - 64, cx - 64, 128, 128)
    ref = np.asarray(Image.fromarray(a[cy - 64:cy + 64, cx - 64:cx + 64]).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(celeba_crop(im, 64), ref)
    ref140 = np.asarray(Image.fromarray(a[39:179, 19:159]).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(celeba_crop_140(im, 64), ref140)
    with pytest.raises(DataError, match='178x218'): celeba_crop(Image.fromarray(a[:200]), 64)

def test_ffhq_resize_is_lanczos():
    a = np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert np.array_equal(ffhq_resize(Image.fromarray(a), 32), np.asarray(Image.fromarray(a).resize((32, 32),
                                                                                                   Image.LANCZOS)))
    assert np.array_equal(ffhq_resize(Image.fromarray(a), 128), a)
    wide = np.random.default_rng(4).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert np.array_equal(ffhq_resize(Image.fromarray(wide), 40), wide[:, 10:50])


# ---------------------------------------------------------------- face and ImageNet folders
def test_celeba_folder_of_jpegs(tmp_path):
    rng, files = np.random.default_rng(5), []
    for i in range(6):
        p = tmp_path/'img_align_celeba'/f'{i + 1:06d}.jpg'
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(p, quality=90)
        files.append(p)
    d = load_data('celeba', root=tmp_path, split='all', resolution=32)
    assert (d.name, d.labels, d.num_classes, d.class_names, d.images.shape) == ('celeba', None, 0, None,
                                                                                (6, 3, 32, 32))
    for k, p in enumerate(files):                           # decoded JPEG -> DDIM/U-ViT crop, exactly
        a = np.asarray(Image.open(p).convert('RGB'))
        ref = np.asarray(Image.fromarray(a[57:185, 25:153]).resize((32, 32), Image.BILINEAR))
        assert torch.equal(d.images[k], unit(ref).permute(2, 0, 1))
    assert load_data('celeba', root=tmp_path).resolution == 64        # the papers' default size
    assert len(load_data('celeba', root=tmp_path)) + len(load_data('celeba', root=tmp_path, split='test')) == 6

def test_ffhq_and_celeba_hq_folders_of_pngs_are_unlabelled(tmp_path):
    rng, arrays = np.random.default_rng(6), {}
    for i in range(5):                                      # FFHQ's numbered subfolders are not classes
        p = tmp_path/'images1024x1024'/f'{i // 3:05d}'/f'{i:05d}.png'
        p.parent.mkdir(parents=True, exist_ok=True)
        arrays[p] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arrays[p]).save(p)
    for name in ('ffhq', 'celeba-hq'):
        d = load_data(name, root=tmp_path/'images1024x1024', split='all', resolution=16)
        assert (d.name, d.labels, d.num_classes, d.images.shape) == (name, None, 0, (5, 3, 16, 16))
        for k, p in enumerate(sorted(arrays)):
            ref = np.asarray(Image.fromarray(arrays[p]).resize((16, 16), Image.LANCZOS))
            assert torch.equal(d.images[k], unit(ref).permute(2, 0, 1))
    native = load_data('ffhq', root=tmp_path, split='all', resolution=64)
    assert torch.equal(native.images[0], unit(arrays[sorted(arrays)[0]]).permute(2, 0, 1))   # PNG is lossless

def test_imagenet_class_folders(tmp_path):
    rng, written = np.random.default_rng(7), []
    for wnid, n in (('n01530575', 3), ('n01440764', 2), ('n02085620', 4)):
        (tmp_path/wnid).mkdir()
        for i in range(n):
            a = rng.integers(0, 256, (rng.integers(40, 80), rng.integers(40, 80), 3), dtype=np.uint8)
            p = tmp_path/wnid/f'{wnid}_{i}.JPEG'
            Image.fromarray(a).save(p, quality=95)
            written.append(p)
    (tmp_path/'n01440764'/'notes.txt').write_text('ignored')
    d = load_data('imagenet', root=tmp_path, split='all', resolution=32)
    assert d.class_names == ['n01440764', 'n01530575', 'n02085620'] and d.num_classes == 3
    assert d.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2] and d.images.shape == (9, 3, 32, 32)
    for k, p in enumerate(sorted(written, key=lambda p: p.relative_to(tmp_path).as_posix())):
        ref = adm_reference(Image.open(p).convert('RGB'), 32)
        assert torch.equal(d.images[k], unit(ref).permute(2, 0, 1))
    one = tmp_path/'single'/'n09999999'
    one.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(one/'a.JPEG')
    s = load_data('imagenet', root=tmp_path/'single', split='all', resolution=8)   # one class folder is still a class
    assert (s.num_classes, s.labels.tolist(), s.class_names) == (1, [0], ['n09999999'])
    assert load_data('imagenet', root=tmp_path, resolution=8, max_images=4).images.shape == (4, 3, 8, 8)

def test_folder_datasets_bad_input_one_clear_error(tmp_path):
    for name, where in (('celeba', 'mmlab.ie.cuhk.edu.hk'), ('ffhq', 'NVlabs/ffhq-dataset'),
                        ('celeba-hq', 'progressive_growing_of_gans'), ('imagenet', 'image-net.org')):
        with pytest.raises(ConfigError, match=where): load_data(name)
        with pytest.raises(DataError, match='image folder not found.*' + where): load_data(name, root=tmp_path/'nope')
        with pytest.raises(DataError, match='no public download'): load_data(name, download=True)
    (tmp_path/'empty').mkdir()
    with pytest.raises(DataError, match='no image files'): load_data('ffhq', root=tmp_path/'empty')
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path/'loose.JPEG')
    with pytest.raises(DataError, match='needs class folders'): load_data('imagenet', root=tmp_path)
    with pytest.raises(DataError, match='no readable images.*178x218'):   # square images are not aligned CelebA
        load_data('celeba', root=tmp_path, split='all')

def test_load_image_preprocess_hook(tmp_path):
    p = tmp_path/'x.png'
    a = np.random.default_rng(8).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(a).save(p)
    out = load_image(p, resolution=10, channels=1, preprocess=lambda im, s: np.asarray(im)[:s, :s])
    assert out.shape == (1, 10, 10) and np.array_equal(out[0], a[:10, :10])
    with pytest.raises(DataError, match='expected 4x4'):
        load_image(p, resolution=4, channels=3, preprocess=lambda im, s: np.asarray(im))


# ---------------------------------------------------------------- memory
def test_memory_check_names_the_size_and_the_remedies(tmp_path, monkeypatch):
    gib = 2**30
    assert check_memory(1000, 3, 32, what='x', total=gib) == 1000 * 3 * 32 * 32 * 4
    with pytest.raises(DataError) as e: check_memory(1_281_167, 3, 256, what='dataset imagenet', total=24 * gib)
    msg = str(e.value)
    assert f'{1_281_167 * 3 * 256 * 256 * 4 / gib:.1f} GiB' in msg and '24.0 GiB' in msg
    assert '50%' in msg and 'data.vae' in msg
    assert f'data.max_images={int(12 * gib // (3 * 256 * 256 * 4))}' in msg
    assert D.physical_memory() is None or D.physical_memory() > 2**28
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path/f'{i}.png')
    monkeypatch.setattr(D, 'physical_memory', lambda: 10_000)     # 3 x 3x32x32x4 = 36,864 bytes > 5,000
    with pytest.raises(DataError, match='data.max_images=1 or fewer'): load_data('ffhq', root=tmp_path, resolution=32,
                                                                               split='all')
    monkeypatch.setattr(D, 'MEMORY_BUDGET', 4.0)
    assert len(load_data('ffhq', root=tmp_path, resolution=32, split='all')) == 3

def test_registry_names():
    assert {'cifar10', 'celeba', 'celeba-hq', 'ffhq', 'imagenet'} <= set(D.DATASETS)
    assert CIFAR10_BATCHES['test'] == ('test_batch',)
