"""CIFAR-10 loading, the synthetic writer, and the device-side data (apl.data)."""
import hashlib
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SYNTHETIC_TEST, SYNTHETIC_TRAIN

import apl.data as data_mod
from apl.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FOLDER,
    NORMALIZATIONS,
    CIFAR10Arrays,
    DataFormatError,
    DataNotFoundError,
    DeviceData,
    balanced_subset,
    epoch_generator,
    load_cifar10,
    random_crop_flip,
    write_cifar10_folder,
)
from apl.noise import symmetric_noise


def unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_written_folder_round_trips(cifar_dir, cifar_arrays):
    files = sorted(p.name for p in (cifar_dir / FOLDER).iterdir())
    assert files == sorted([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])
    assert cifar_arrays.train_x.shape == (SYNTHETIC_TRAIN, 32, 32, 3) and cifar_arrays.train_x.dtype == np.uint8
    assert cifar_arrays.test_x.shape == (SYNTHETIC_TEST, 32, 32, 3)
    assert cifar_arrays.train_y.dtype == np.int64
    assert np.bincount(cifar_arrays.train_y, minlength=10).tolist() == [SYNTHETIC_TRAIN // 10] * 10
    assert len(cifar_arrays.classes) == 10 and cifar_arrays.classes[9] == "truck"
    # Independent parse of the first batch: rows are R, G, B planes.
    d = unpickle(cifar_dir / FOLDER / "data_batch_1")
    first = np.asarray(d["data"])
    n1 = first.shape[0]
    assert np.array_equal(cifar_arrays.train_x[:n1], first.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert cifar_arrays.train_y[:n1].tolist() == list(d["labels"])
    assert "synthetic" in cifar_arrays.source and not cifar_arrays.official


def test_folder_itself_is_accepted(cifar_dir, cifar_arrays):
    again = load_cifar10(cifar_dir / FOLDER, download=False)
    assert np.array_equal(again.test_x, cifar_arrays.test_x)


def test_synthetic_classes_differ(cifar_arrays):
    # Learnable: per-class mean colours are far apart compared to their spread.
    means = np.stack([cifar_arrays.train_x[cifar_arrays.train_y == c].reshape(-1, 3).mean(0) for c in range(10)])
    dists = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dists[~np.eye(10, dtype=bool)].min() > 10


def test_missing_folder_names_the_expected_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match=FOLDER) as e:
        load_cifar10(tmp_path / "nowhere", download=False)
    assert isinstance(e.value, FileNotFoundError)
    assert "download=True" in str(e.value) or "cifar-10-python.tar.gz" in str(e.value)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataNotFoundError, match="download failed.*no network.*cifar-10-batches-py"):
        load_cifar10(tmp_path, download=True)


def test_incomplete_folder(tmp_path):
    write_cifar10_folder(tmp_path, 50, 10, seed=0)
    (tmp_path / FOLDER / "test_batch").unlink()
    with pytest.raises(DataNotFoundError, match="missing test_batch"):
        load_cifar10(tmp_path, download=False)


def test_malformed_files(tmp_path):
    write_cifar10_folder(tmp_path, 50, 10, seed=0)
    (tmp_path / FOLDER / "data_batch_2").write_bytes(b"this is not a pickle")
    with pytest.raises(DataFormatError, match="data_batch_2"):
        load_cifar10(tmp_path, download=False)
    with open(tmp_path / FOLDER / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((3, 100), dtype=np.uint8), "labels": [0, 1, 2]}, f)
    with pytest.raises(ValueError, match=r"data_batch_2.*\(n, 3072\)"):
        load_cifar10(tmp_path, download=False)
    with open(tmp_path / FOLDER / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), dtype=np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(DataFormatError, match="'data'/'labels'"):
        load_cifar10(tmp_path, download=False)


def test_files_naming_numpy_1s_module_path_are_read(tmp_path):
    """The official files name numpy.core (numpy 1): the arrays-only unpickler reads them without a
    warning (one that names anything else is refused: tests/test_misuse.py)."""
    write_cifar10_folder(tmp_path, 50, 10, seed=0)
    batch = tmp_path / FOLDER / "data_batch_1"
    # numpy 1's module path, as in the official files: still read
    batch.write_bytes(batch.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert b"numpy.core.multiarray" in batch.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_cifar10(tmp_path, download=False).train_x.shape == (50, 32, 32, 3)


def test_a_missing_folder_is_downloaded_unless_said_not_or_in_docker(tmp_path, monkeypatch):
    import torchvision.datasets

    tried = []

    def offline(root, **kwargs):
        tried.append(root)
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.delenv("APL_IN_DOCKER", raising=False)
    for download, attempts in [(None, 1), (True, 1), (False, 0)]:
        tried.clear()
        with pytest.raises(DataNotFoundError):
            load_cifar10(tmp_path / "none", download=download)
        assert len(tried) == attempts, download
    monkeypatch.setenv("APL_IN_DOCKER", "1")  # in the image: only when asked for
    for download, attempts in [(None, 0), (True, 1), (False, 0)]:
        tried.clear()
        with pytest.raises(DataNotFoundError, match="-v /path/on/host:"):
            load_cifar10(tmp_path / "none", download=download)
        assert len(tried) == attempts, download


def _unmark(root):
    """Drop the synthetic marker: the folder now looks like a (non-official) CIFAR-10 copy."""
    meta_path = root / FOLDER / "batches.meta"
    meta = unpickle(meta_path)
    meta.pop("apl_synthetic_seed")
    with open(meta_path, "wb") as f:
        pickle.dump(meta, f, protocol=2)


def test_md5_mismatch_warns_once_and_still_loads(tmp_path):
    write_cifar10_folder(tmp_path, 50, 10, seed=1)
    _unmark(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = load_cifar10(tmp_path, download=False)
    msgs = [str(w.message) for w in caught if "byte-identical" in str(w.message)]
    assert len(msgs) == 1
    assert "re-encoded copy" in msgs[0] and str(tmp_path) in msgs[0]
    assert a.train_x.shape == (50, 32, 32, 3)
    assert "not byte-identical" in a.source and not a.official


def test_matching_md5s_report_official(tmp_path, monkeypatch):
    write_cifar10_folder(tmp_path, 50, 10, seed=1)
    _unmark(tmp_path)
    own = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (tmp_path / FOLDER).iterdir()}
    monkeypatch.setattr(data_mod, "official_md5s", lambda: own)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = load_cifar10(tmp_path, download=False)
    assert a.official and a.source.startswith("official")


def test_official_md5_table_comes_from_torchvision():
    from torchvision.datasets import CIFAR10
    table = data_mod.official_md5s()
    assert table["test_batch"] == CIFAR10.test_list[0][1]
    assert len(table) == 7


def test_arrays_validate_shapes():
    x = np.zeros((4, 32, 32, 3), np.uint8)
    y = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="train_x"):
        CIFAR10Arrays(np.zeros((4, 3, 32, 32), np.uint8), y, x, y, tuple("abcdefghij"), "s")
    with pytest.raises(ValueError, match="test_y"):
        CIFAR10Arrays(x, y, x, np.zeros(3, np.int64), tuple("abcdefghij"), "s")


def test_noise_only_on_train_labels(cifar_arrays):
    on_device = DeviceData(cifar_arrays, noise=0.5, noise_type="symmetric", seed=4)
    assert torch.equal(on_device.test_y, torch.from_numpy(cifar_arrays.test_y))
    assert torch.equal(on_device.train_y_clean, torch.from_numpy(cifar_arrays.train_y))
    expected, rec = symmetric_noise(cifar_arrays.train_y, 0.5, 10, seed=4)
    assert torch.equal(on_device.train_y_noisy, torch.from_numpy(expected))
    assert on_device.noise_record.realised_rate == rec.realised_rate > 0.3


def test_images_are_normalised(cifar_arrays):
    on_device = DeviceData(cifar_arrays, channels_last=False)
    x = cifar_arrays.train_x[7].astype(np.float32) / 255.0  # HWC
    expected = (x - np.array(CIFAR10_MEAN, np.float32)) / np.array(CIFAR10_STD, np.float32)
    assert torch.allclose(on_device.train_x[7], torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)
    assert on_device.train_x.is_contiguous()
    on_device_cl = DeviceData(cifar_arrays, channels_last=True)
    assert on_device_cl.train_x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(on_device_cl.train_x, on_device.train_x)


def test_the_authors_normalisation_maps_pixels_to_minus_one_one(cifar_arrays):
    mean, std = NORMALIZATIONS["half"]
    on_device = DeviceData(cifar_arrays, channels_last=False, mean=mean, std=std)
    x = torch.from_numpy(cifar_arrays.train_x[:20].astype(np.float32)).permute(0, 3, 1, 2)
    assert torch.allclose(on_device.train_x[:20], x / 127.5 - 1.0, atol=1e-6)  # ToTensor, Normalize(0.5, 0.5)
    assert NORMALIZATIONS["cifar"] == (CIFAR10_MEAN, CIFAR10_STD)


def test_batches_cover_the_epoch_and_depend_only_on_seed_and_epoch(cifar_arrays):
    on_device = DeviceData(cifar_arrays, noise=0.3, seed=2)
    torch.manual_seed(0)
    ep0 = list(on_device.train_batches(0, 64))
    torch.manual_seed(12345)  # the global RNG must not matter
    ep0_again = list(on_device.train_batches(0, 64))
    ep1 = list(on_device.train_batches(1, 64))
    full, rest = divmod(SYNTHETIC_TRAIN, 64)
    assert [b[0].shape[0] for b in ep0] == [64] * full + [rest]
    for a, b in zip(ep0, ep0_again):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(ep0[0][2], ep1[0][2])
    # Every image exactly once, with its own noisy and clean label.
    x = torch.cat([b[0] for b in ep0])
    key = x.flatten(1).sum(1)
    order = torch.argsort(key)
    ref_order = torch.argsort(on_device.train_x.flatten(1).sum(1))
    assert torch.equal(x[order], on_device.train_x[ref_order])
    assert torch.equal(torch.cat([b[1] for b in ep0])[order], on_device.train_y_noisy[ref_order])
    assert torch.equal(torch.cat([b[2] for b in ep0])[order], on_device.train_y_clean[ref_order])


def test_single_image_last_batch_is_dropped(cifar_arrays):
    on_device = DeviceData(cifar_arrays, train_subset=101)
    sizes = [b[0].shape[0] for b in on_device.train_batches(0, 10)]
    assert sizes == [10] * 10
    with pytest.raises(ValueError, match="batch_size"):
        next(on_device.train_batches(0, 1))


def reference_crop_flip(x, oy, ox, flip, fill, pad=4):
    """Per-image torchvision-style crop of a padded image, then optional mirror."""
    c, h, w = x.shape
    padded = fill.view(c, 1, 1).expand(c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, pad:pad + h, pad:pad + w] = x
    out = padded[:, oy:oy + h, ox:ox + w]
    return out.flip(2) if flip else out


def test_random_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g)
    offsets = torch.randint(0, 9, (16, 2), generator=g)
    flips = torch.randint(0, 2, (16,), generator=g)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = random_crop_flip(x, offsets, flips, fill)
    assert out.shape == x.shape
    for i in range(16):
        ref = reference_crop_flip(x[i], int(offsets[i, 0]), int(offsets[i, 1]), bool(flips[i]), fill)
        assert torch.equal(out[i], ref)
    centre = random_crop_flip(x, torch.full((16, 2), 4), torch.zeros(16), fill)
    assert torch.equal(centre, x)
    corner = random_crop_flip(x[:1], torch.zeros(1, 2, dtype=torch.long), torch.ones(1), fill)
    assert torch.all(corner[0, 1, :4, :] == -2.0)  # padding rows carry the per-channel fill


def test_augmentation_shapes_determinism_and_fill(cifar_arrays):
    on_device = DeviceData(cifar_arrays, augment=True, seed=5)
    plain = DeviceData(cifar_arrays, augment=False, seed=5)
    a = list(on_device.train_batches(3, 50))
    b = list(on_device.train_batches(3, 50))
    c = list(on_device.train_batches(4, 50))
    assert all(x.shape == (50, 3, 32, 32) for x, _, _ in a)
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    # Same order as without augmentation (the permutation is drawn first), but different pixels.
    p = list(plain.train_batches(3, 50))
    assert torch.equal(a[0][2], p[0][2]) and not torch.equal(a[0][0], p[0][0])
    # Black padding, normalised: the fill is (0 - mean) / std.
    assert torch.allclose(on_device.fill, -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD))
    # And F.pad-free check of value range: crops only contain image values or the fill.
    allowed_min = torch.minimum(on_device.train_x.amin(dim=(0, 2, 3)), on_device.fill)
    assert torch.all(a[0][0].amin(dim=(0, 2, 3)) >= allowed_min - 1e-6)


def test_epoch_generator_is_a_function_of_seed_and_epoch():
    a = torch.rand(5, generator=epoch_generator(1, 2))
    b = torch.rand(5, generator=epoch_generator(1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.rand(5, generator=epoch_generator(1, 3)))
    assert not torch.equal(a, torch.rand(5, generator=epoch_generator(2, 2)))


def test_balanced_subset():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=2000)
    s100 = balanced_subset(labels, 100, seed=1)
    counts = np.bincount(labels[s100], minlength=10)
    assert counts.tolist() == [10] * 10
    s37 = balanced_subset(labels, 37, seed=1)
    assert np.bincount(labels[s37], minlength=10).max() - np.bincount(labels[s37], minlength=10).min() <= 1
    assert set(s37) <= set(s100)  # first K of one ordering
    assert np.array_equal(s100, balanced_subset(labels, 100, seed=1))
    assert not np.array_equal(s100, balanced_subset(labels, 100, seed=2))
    assert len(np.unique(s100)) == 100
    for k in (0, 2001, 5.0):
        with pytest.raises(ValueError, match="subset size"):
            balanced_subset(labels, k)


def test_device_data_subsets(cifar_arrays):
    on_device = DeviceData(cifar_arrays, train_subset=50, test_subset=20, noise=0.4, noise_type="ma2020_symmetric")
    assert on_device.num_train == 50 and on_device.num_test == 20
    assert torch.bincount(on_device.train_y_clean, minlength=10).tolist() == [5] * 10
    assert torch.bincount(on_device.test_y, minlength=10).tolist() == [2] * 10
    assert on_device.noise_record.num_samples == 50
    assert on_device.noise_record.realised_rate == pytest.approx(10 * int(0.4 * 5) / 50)


def test_writer_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        write_cifar10_folder(tmp_path, n_train=2)
    with pytest.raises(ValueError, match="n_test"):
        write_cifar10_folder(tmp_path, n_train=10, n_test=0)


def test_padding_reference_agrees_with_f_pad():
    # Sanity of the test's own reference against torch's constant padding for a zero fill.
    x = torch.randn(3, 32, 32)
    ref = reference_crop_flip(x, 1, 6, False, torch.zeros(3))
    assert torch.equal(ref, F.pad(x, (4, 4, 4, 4))[:, 1:33, 6:38])
