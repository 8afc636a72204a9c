"""CIFAR-10 on disk (torchvision's pickle layout) and on the training device.

- :func:`load_cifar10` reads ``<data_dir>/cifar-10-batches-py`` directly (no torchvision
  integrity refusal), compares the files' MD5s with the official ones and says in
  ``CIFAR10Arrays.source`` (and one warning) when they differ, e.g. a re-encoded copy. The
  files are pickles: they are read with an unpickler that builds numpy arrays and plain values
  only, so a file that would run code is refused as damaged, never executed. A missing folder
  is downloaded (:func:`ensure_cifar10`) unless the user said not to or, in the Docker image,
  did not ask for it (a download there is lost with the container).
- :func:`write_cifar10_folder` writes a small *synthetic* dataset in the same layout, with
  learnable class structure, so tests exercise the real loading code.
- :class:`DeviceData` holds the normalised images on the device, applies label noise to
  the training labels only (keeping the clean ones), and yields batches and augmentation
  from a per-epoch generator seeded by ``(seed, epoch)``, never from the global RNG.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apl.errors import DataError
from apl.noise import NoiseRecord, apply_noise

__all__ = [
    "CIFAR10Arrays", "DataNotFoundError", "DataFormatError", "DeviceData", "load_cifar10", "ensure_cifar10",
    "download_by_default",
    "write_cifar10_folder", "balanced_subset", "random_crop_flip", "epoch_generator",
    "official_md5s", "FOLDER", "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "NORMALIZATIONS",
]

#: The folder torchvision's CIFAR10 extracts to, inside ``data_dir``.
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
#: Normalisation of the cited work's code (per-channel mean/std of the CIFAR-10 train set).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: ``TrainConfig.normalize`` -> (mean, std) per channel after ToTensor's [0, 1]: the cited work's
#: constants, or the seed paper's author's Normalize(0.5, 0.5) to [-1, 1] (the paper states none).
NORMALIZATIONS = {"cifar": (CIFAR10_MEAN, CIFAR10_STD), "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
#: Key in batches.meta marking a folder written by :func:`write_cifar10_folder`.
_SYNTHETIC_KEY = "apl_synthetic_seed"


class DataNotFoundError(DataError, FileNotFoundError):
    """The CIFAR-10 folder (or one of its files) is missing and could not be downloaded."""


class DataFormatError(DataError, ValueError):
    """A file of the CIFAR-10 folder is not a CIFAR-10 pickle of the expected shape."""


#: The globals a CIFAR-10 pickle may name: numpy arrays (numpy 1 and 2 module paths) and the bytes
#: of protocol 2. Anything else would run code of the file's choosing when unpickled.
_PICKLE_GLOBALS = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                             ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                             ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")})


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain Python values, and refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it would load {module}.{name}, which a CIFAR-10 file never holds "
                                         f"(refused, not run)")
        return super().find_class(module, name)


@dataclass
class CIFAR10Arrays:
    """CIFAR-10 in memory: images uint8 (N, 32, 32, 3) (torchvision's HWC layout), labels int64."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple
    source: str
    official: bool = False

    def __post_init__(self):
        for name in ("train", "test"):
            x, y = getattr(self, f"{name}_x"), getattr(self, f"{name}_y")
            if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (32, 32, 3)):
                raise ValueError(f"{name}_x must be a uint8 array (N, 32, 32, 3), got "
                                 f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
            if not (isinstance(y, np.ndarray) and y.ndim == 1 and y.shape[0] == x.shape[0]):
                raise ValueError(f"{name}_y must be a 1-D array with one label per image ({x.shape[0]})")
            if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
                raise ValueError(f"{name}_y has labels outside 0..{len(self.classes) - 1}")
        self.train_y = self.train_y.astype(np.int64, copy=False)
        self.test_y = self.test_y.astype(np.int64, copy=False)


def official_md5s() -> dict:
    """File name -> MD5 of the official CIFAR-10 python files (torchvision's own table)."""
    from torchvision.datasets import CIFAR10

    table = dict(CIFAR10.train_list + CIFAR10.test_list)
    table[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    return table


_MD5_CACHE: dict = {}


def _md5(path: Path) -> str:
    # Cached: a grid loads the same folder many times in one process, and hashing it is not free.
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MD5_CACHE:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _MD5_CACHE[key] = h.hexdigest()
    return _MD5_CACHE[key]


def _in_docker() -> bool:
    return os.environ.get("APL_IN_DOCKER") == "1"


def download_by_default() -> bool:
    """Whether a missing CIFAR-10 is downloaded when the user did not say (``download=None``): yes,
    except in the Docker image, where the download would be lost with the container."""
    return not _in_docker()


def _how_to_get(folder: Path) -> str:
    if _in_docker():
        # In the image a download is lost with the container: the data has to be mounted.
        return (f"expected the CIFAR-10 python folder {folder} (data_batch_1..5, test_batch, batches.meta), "
                f"which this Docker image does not hold (built with --build-arg CIFAR10=skip, or another "
                f"--data-dir). Mount the host folder that holds cifar-10-batches-py: add "
                f"`-v /path/on/host:{folder.parent}:ro` to `docker run`. To get the data there, extract "
                f"cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into that folder "
                f"(or pass --download to fetch it into this container, lost when it ends)")
    return (f"expected the CIFAR-10 python folder {folder} (data_batch_1..5, test_batch, batches.meta). "
            f"Get it with internet access via `python -c \"import torchvision; "
            f"torchvision.datasets.CIFAR10('{folder.parent}', download=True)\"`, or extract "
            f"cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into {folder.parent}")


def _damaged(path: Path, why: str) -> DataFormatError:
    """The error for a CIFAR-10 file that is not what it should be, with the way out."""
    return DataFormatError(f"{path} is not a CIFAR-10 file ({why}): the data folder {path.parent} is damaged; "
                           f"replace it with a fresh copy ({_how_to_get(path.parent)})")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="latin1").load()
    except OSError as e:  # gone (or unreadable) since the folder was listed
        raise DataNotFoundError(f"cannot read {path} ({e.strerror or e}); {_how_to_get(path.parent)}") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged pickle raises: the file is named, never trusted
        raise _damaged(path, f"{type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise _damaged(path, f"holds a {type(d).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or "labels" not in d:
        raise _damaged(path, f"it lacks the 'data'/'labels' entries of a CIFAR-10 batch; keys: {sorted(map(str, d))}")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise _damaged(path, f"'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}")
    integer = np.issubdtype(labels.dtype, np.integer) or labels.size == 0  # [] loads as float64
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not integer:
        raise _damaged(path, f"'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise _damaged(path, f"labels outside 0..9, min {labels.min()}, max {labels.max()}")
    # Rows are the R, G, B planes of a 32x32 image: to (n, 32, 32, 3) as torchvision does.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _resolve_folder(data_dir) -> Path:
    d = Path(data_dir)
    # Accept the batches folder itself as well as its parent.
    if d.name == FOLDER and (d / META_FILE).exists():
        return d
    return d / FOLDER


def ensure_cifar10(data_dir, download: bool | None = None) -> Path:
    """The CIFAR-10 python folder of ``data_dir``, downloaded with torchvision (checksummed) when it is
    missing and ``download`` (``None``: :func:`download_by_default`). :class:`DataNotFoundError` names the
    folder and how to get it when it is missing and not downloaded, or the download fails."""
    folder = _resolve_folder(data_dir).absolute()
    if folder.is_dir():
        return folder
    if not (download_by_default() if download is None else download):
        raise DataNotFoundError(f"CIFAR-10 not found: {_how_to_get(folder)}")
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(folder.parent), train=True, download=True)
    except Exception as e:  # offline, proxy, disk full...: one clear message
        raise DataNotFoundError(f"CIFAR-10 not found and the download failed ({type(e).__name__}: {e}); "
                                f"{_how_to_get(folder)}") from e
    return folder


def load_cifar10(data_dir, download: bool | None = None) -> CIFAR10Arrays:
    """Load CIFAR-10 from ``<data_dir>/cifar-10-batches-py``.

    A missing folder is downloaded as :func:`ensure_cifar10` says (``download``: True, False, or
    None for :func:`download_by_default`); when it is not, :class:`DataNotFoundError` names the
    folder and how to get it. A present folder is read directly; if its files' MD5s differ from
    the official ones it still loads, with one warning and a ``source`` that says so. Files that
    are not CIFAR-10 pickles (or would run code when unpickled) raise :class:`DataFormatError`.
    """
    folder = ensure_cifar10(data_dir, download)
    names = TRAIN_FILES + (TEST_FILE, META_FILE)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataNotFoundError(f"CIFAR-10 folder {folder} is incomplete (missing {', '.join(missing)}); "
                                f"{_how_to_get(folder)}")

    meta = _unpickle(folder / META_FILE)
    classes = meta.get("label_names")
    if not isinstance(classes, (list, tuple)) or len(classes) != 10:
        raise _damaged(folder / META_FILE, f"'label_names' must list 10 classes, got {classes!r}")
    parts = [_read_batch(folder / n) for n in TRAIN_FILES]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_batch(folder / TEST_FILE)

    if _SYNTHETIC_KEY in meta:
        source, official = (f"synthetic CIFAR-10-shaped data (apl.data.write_cifar10_folder, "
                            f"seed={meta[_SYNTHETIC_KEY]}) at {folder}, not CIFAR-10"), False
    else:
        reference = official_md5s()
        differ = [n for n in names if _md5(folder / n) != reference[n]]
        if differ:
            warnings.warn(f"CIFAR-10 at {folder} is not byte-identical to the official files "
                          f"(e.g. a re-encoded copy); results may differ from the official data",
                          UserWarning, stacklevel=2)
            source, official = (f"CIFAR-10 at {folder}, not byte-identical to the official files "
                                f"({len(differ)} of {len(names)} MD5s differ)"), False
        else:
            source, official = f"official CIFAR-10 (MD5-verified) at {folder}", True
    return CIFAR10Arrays(np.ascontiguousarray(train_x), train_y, np.ascontiguousarray(test_x), test_y,
                         tuple(str(c) for c in classes), source, official)


def _synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images whose class shows as a colour and a grating orientation, plus pixel noise."""
    n = labels.size
    palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]],
                       dtype=np.float32)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    angle = labels.astype(np.float32) * (np.pi / 10)
    phase = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
    wave = np.sin(0.8 * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
                  + phase[:, None, None])
    # Weights chosen so a small CNN learns clean labels within a few epochs while 60 % label
    # noise still visibly hurts (a test bed for the losses, not a trivial one).
    img = 0.3 * palette[labels][:, None, None, :] + 40.0 * wave[..., None] + 0.7 * 128.0
    img += rng.normal(0.0, 50.0, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10_folder(root, n_train: int = 500, n_test: int = 100, seed: int = 0) -> Path:
    """Write synthetic CIFAR-10-shaped data to ``<root>/cifar-10-batches-py``; return ``root``.

    Same files and pickle layout as the official python version (data_batch_1..5 splitting
    ``n_train`` images, test_batch, batches.meta), balanced labels, and class-dependent
    colour and texture so a CNN can learn it. ``batches.meta`` marks the folder as
    synthetic, so :func:`load_cifar10` reports it as such in ``source``.
    """
    for name, v, lo in (("n_train", n_train, 5), ("n_test", n_test, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    rng = np.random.default_rng(seed)
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n, label):
        y = rng.permutation(np.arange(n) % 10)
        x = _synthetic_images(y, rng)  # (n, 32, 32, 3)
        return {"batch_label": label, "labels": [int(v) for v in y],
                "data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(n, 3072)),
                "filenames": [f"synthetic_{label.replace(' ', '_')}_{i:05d}.png" for i in range(n)]}

    sizes = [len(a) for a in np.array_split(np.arange(n_train), 5)]
    for i, (name, size) in enumerate(zip(TRAIN_FILES, sizes), start=1):
        _write_pickle(folder / name, batch(size, f"training batch {i} of 5"))
    _write_pickle(folder / TEST_FILE, batch(n_test, "testing batch 1 of 1"))
    _write_pickle(folder / META_FILE, {"num_cases_per_batch": max(sizes), "label_names": list(CIFAR10_CLASSES),
                                       "num_vis": 3072, _SYNTHETIC_KEY: int(seed)})
    return Path(root)


def balanced_subset(labels: np.ndarray, k: int, seed: int = 0, num_classes: int = 10) -> np.ndarray:
    """Indices (sorted) of the first ``k`` of a seeded class-balanced ordering of ``labels``.

    The ordering takes each class's samples in a seeded random order and interleaves the
    classes round-robin, so any ``k`` gets every class within one sample of ``k / C`` (while
    they last) and a smaller ``k`` selects a subset of a larger one.
    """
    labels = np.asarray(labels)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= labels.size:
        raise ValueError(f"subset size must be an integer in [1, {labels.size}], got {k!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.size)
    rank = np.empty(labels.size, dtype=np.int64)
    for c in range(num_classes):
        members = order[labels[order] == c]
        rank[members] = np.arange(members.size)
    class_pos = rng.permutation(num_classes)[labels]  # which class goes first within a round
    chosen = np.lexsort((class_pos, rank))[:k]
    return np.sort(chosen)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch's shuffling and augmentation, from ``(seed, epoch)`` only."""
    state = np.random.SeedSequence([int(seed), int(epoch), 0xA91]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device="cpu")
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return g


def random_crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                     fill: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) from its ``pad``-padded version, then maybe flip it.

    ``offsets`` (B, 2) holds each crop's top-left corner (row, col) in [0, 2*pad];
    ``flips`` (B,) is nonzero where the crop is mirrored left-right; ``fill`` (C,) is the
    padding value per channel (black, in normalised units). One gather does both, as
    torchvision's ``RandomCrop(H, padding=pad)`` then ``RandomHorizontalFlip()`` would per
    image. The result is in channels_last memory format.
    """
    b, c, h, w = x.shape
    dev = x.device
    padded = fill.to(dev, x.dtype).view(1, 1, 1, c).expand(b, h + 2 * pad, w + 2 * pad, c).clone()
    padded[:, pad:pad + h, pad:pad + w, :] = x.permute(0, 2, 3, 1)
    offsets = offsets.to(dev)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = offsets[:, 0, None] + ar_h
    cols = offsets[:, 1, None] + torch.where(flips.to(dev)[:, None].bool(), (w - 1) - ar_w, ar_w)
    out = padded[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


class DeviceData:
    """The training and test sets on ``device``: normalised float images, clean and noisy labels.

    Order of operations: the optional ``train_subset``/``test_subset`` (the first K of a
    class-balanced ordering seeded by ``subset_seed``, :func:`balanced_subset`), then label
    noise of ``noise_type`` and rate ``noise`` seeded by ``seed`` on the training labels
    only (:mod:`apl.noise`); ``noise_record`` says what it did. Test labels stay clean.
    """

    def __init__(self, arrays: CIFAR10Arrays, *, device="cpu", noise: float = 0.0,
                 noise_type: str = "symmetric", seed: int = 0, train_subset: int | None = None,
                 test_subset: int | None = None, subset_seed: int = 0, augment: bool = False,
                 channels_last: bool = False, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        self.device = torch.device(device)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.channels_last = bool(channels_last)
        num_classes = len(arrays.classes)
        tr = np.arange(arrays.train_y.size) if train_subset is None else \
            balanced_subset(arrays.train_y, train_subset, subset_seed, num_classes)
        te = np.arange(arrays.test_y.size) if test_subset is None else \
            balanced_subset(arrays.test_y, test_subset, subset_seed, num_classes)
        clean = arrays.train_y[tr]
        noisy, record = apply_noise(clean, noise_type, noise, num_classes, seed)
        self.noise_record: NoiseRecord = record
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device)
        #: Black (0) in normalised units: what RandomCrop's zero padding becomes after Normalize.
        self.fill = -self._mean / self._std
        self.train_x = self._images(arrays.train_x[tr])
        self.test_x = self._images(arrays.test_x[te])
        self.train_y_clean = torch.from_numpy(clean).to(self.device)
        self.train_y_noisy = torch.from_numpy(noisy).to(self.device)
        self.test_y = torch.from_numpy(arrays.test_y[te]).to(self.device)

    def _images(self, x_hwc: np.ndarray) -> torch.Tensor:
        # Move uint8 (4x smaller) and convert on the device; NHWC storage *is* channels_last.
        x = torch.from_numpy(np.ascontiguousarray(x_hwc)).to(self.device)
        x = x.float().div_(255.0).sub_(self._mean).div_(self._std).permute(0, 3, 1, 2)  # in place: 50k images
        return x if self.channels_last else x.contiguous()

    @property
    def num_train(self) -> int:
        """Number of training images."""
        return self.train_x.shape[0]

    @property
    def num_test(self) -> int:
        """Number of test images."""
        return self.test_x.shape[0]

    def train_batches(self, epoch: int, batch_size: int):
        """Yield ``(images, noisy_labels, clean_labels)`` for one epoch.

        The order (and the crops/flips when ``augment``) come from
        :func:`epoch_generator` ``(seed, epoch)``: the same epoch always gives the same
        batches. A last batch of a single image is dropped (BatchNorm cannot train on it).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
        g = epoch_generator(self.seed, epoch)
        n = self.num_train
        perm = torch.randperm(n, generator=g)
        if self.augment:
            offsets = torch.randint(0, 9, (n, 2), generator=g)
            flips = torch.randint(0, 2, (n,), generator=g)
        perm_dev = perm.to(self.device)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if stop - start < 2:
                break
            idx = perm_dev[start:stop]
            x = self.train_x[idx]
            if self.augment:
                x = random_crop_flip(x, offsets[start:stop], flips[start:stop], self.fill)
                if not self.channels_last:
                    x = x.contiguous()
            yield x, self.train_y_noisy[idx], self.train_y_clean[idx]

    def test_batches(self, batch_size: int = 1000):
        """Yield ``(images, labels)`` of the clean test set, in order."""
        for start in range(0, self.num_test, batch_size):
            yield self.test_x[start:start + batch_size], self.test_y[start:start + batch_size]
