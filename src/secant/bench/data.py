"""Data for the benchmark problems: generators that need no download, and loaders for the
standard on-disk formats of a user's local copy (MNIST IDX, CIFAR-10 binary batches), each
file as is or compressed (``.gz``, ``.bz2``, ``.xz``, ``.zip``).

Every loader raises :class:`BenchError` with a one-line message that names the file and what
was expected, never a bare ``OSError``, a decompressor's error or a reshape error.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class BenchError(Exception):
    """A user-facing error of the benchmark harness (bad input, missing or malformed data)."""


def describe(exc: BaseException) -> str:
    """``exc`` in one line: its type (with its module where the name alone says nothing, as
    ``zlib.error``) and the first line of its message."""
    text = str(exc).strip()
    name = type(exc).__name__
    name = f"{type(exc).__module__}.{name}" if name == "error" else name
    return name + (f": {text.splitlines()[0]}" if text else "")


# ---------------------------------------------------------------------------------- files
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
COMPRESSED = (*_OPENERS, ".zip")
# what reading a missing, unreadable, truncated or corrupt (compressed) file raises
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile,
                RuntimeError, NotImplementedError)


def read_bytes(path: str | Path, what: str = "data file") -> bytes:
    """The bytes of a data file, decompressed when its name ends in ``.gz``, ``.bz2``,
    ``.xz`` or ``.zip`` (an archive of one file). Every failure, a corrupt compressed body
    included, raises :class:`BenchError` naming the file."""
    path = Path(path)
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if not n.endswith("/")]
                if len(names) != 1:
                    raise BenchError(f"{what} {path}: a zip archive of {len(names)} files, "
                                     "expected one")
                return archive.read(names[0])
        if path.suffix in _OPENERS:
            with _OPENERS[path.suffix](path) as fh:
                return fh.read()
        return path.read_bytes()
    except _READ_ERRORS as exc:
        raise BenchError(f"cannot read {what} {path}: {describe(exc)} (missing, truncated or "
                         "corrupt file)") from None


def find_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` in ``folder``, as is or compressed (``name.gz``, ...)."""
    for name in names:
        for suffix in ("", *COMPRESSED):
            if (folder / (name + suffix)).is_file():
                return folder / (name + suffix)
    return None


# ---------------------------------------------------------------------------------- CURVES-like
CURVES_TRAIN = 20_000
CURVES_TEST = 10_000


def curves_images(n: int, seed: int, size: int = 28, chunk: int = 500) -> Tensor:
    """``n`` CURVES-like images, shape ``(n, size*size)``, float32 in [0, 1], deterministic in
    ``seed``.

    Our own recipe (the original ``digs3pts_1.mat`` generator is not published; see
    docs/bench.md, Problems), so losses are *not* comparable to published CURVES numbers:

    1. draw three points ``p0, p1, p2`` uniformly in ``[2, size−3]²`` (pixel units);
    2. the curve is the parabola arc through them, ``c(t) = p0 L0(t) + p1 L1(t) + p2 L2(t)``
       with the quadratic Lagrange basis on the nodes ``t = 0, 1/2, 1`` (so it passes through
       all three points), sampled at 96 values of ``t ∈ [0, 1]``;
    3. each pixel centre ``q`` gets intensity ``exp(−d(q)² / (2σ²))``, ``d`` the distance to the
       nearest curve sample, pen width ``σ`` drawn uniformly in ``[0.7, 1.1]`` per image.
    """
    if n < 0:
        raise ValueError(f"n={n}: expected >= 0")
    rng = np.random.default_rng(seed)
    pts = rng.uniform(2.0, size - 3.0, size=(n, 3, 2))
    sigma = torch.from_numpy(rng.uniform(0.7, 1.1, size=(n, 1))).float()
    t = np.linspace(0.0, 1.0, 96)
    basis = np.stack([2 * (t - 0.5) * (t - 1), -4 * t * (t - 1), 2 * t * (t - 0.5)])  # (3, S)
    curve = torch.from_numpy(np.einsum("kt,nkd->ntd", basis, pts)).float()  # (n, S, 2) as (x, y)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)),
                            indexing="ij")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)  # (P, 2) pixel centres as (x, y)
    out = torch.empty(n, size * size)
    for lo in range(0, n, chunk):
        c = curve[lo : lo + chunk]
        d = torch.cdist(grid.expand(len(c), -1, -1), c).min(-1).values  # (b, P)
        out[lo : lo + chunk] = torch.exp(-(d**2) / (2.0 * sigma[lo : lo + chunk] ** 2))
    return out.clamp_(0.0, 1.0)


def curves_dataset(seed: int = 0) -> tuple[Tensor, Tensor]:
    """The CURVES-like split: 20,000 train and 10,000 test images, from one seeded stream."""
    x = curves_images(CURVES_TRAIN + CURVES_TEST, seed)
    return x[:CURVES_TRAIN], x[CURVES_TRAIN:]


# ---------------------------------------------------------------------------------- MNIST IDX
MNIST_FILES = {
    "train": "train-images-idx3-ubyte",
    "test": "t10k-images-idx3-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (compressed if its name says so, :func:`read_bytes`) into an array
    of its shape.

    Format: two zero bytes, a type byte (0x08 = unsigned byte, ...), a byte with the number of
    dimensions, then one big-endian uint32 per dimension, then the data.
    """
    path = Path(path)
    raw = read_bytes(path, "IDX file")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise BenchError(f"{path}: not an IDX file (expected magic bytes 00 00 <type> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise BenchError(f"{path}: truncated IDX header (expected {ndim} dimension sizes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise BenchError(
            f"{path}: IDX data is {len(raw) - header} bytes, expected {expected} for shape "
            f"{tuple(shape)} (truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_mnist(data_dir: str | Path | None) -> tuple[Tensor, Tensor]:
    """MNIST images from local IDX files, flattened to 784 and scaled to [0, 1]:
    ``train-images-idx3-ubyte`` (60,000) and ``t10k-images-idx3-ubyte`` (10,000), each
    optionally compressed (``.gz``, ``.bz2``, ``.xz``, ``.zip``), in ``data_dir``."""
    expected = " and ".join(MNIST_FILES.values()) + ", optionally .gz, .bz2, .xz or .zip"
    if data_dir is None:
        raise BenchError(f"problem 'mnist' needs --data-dir with the MNIST IDX files ({expected})")
    data_dir = Path(data_dir)
    out = []
    for stem in MNIST_FILES.values():
        # some mirrors name them train-images.idx3-ubyte
        path = find_file(data_dir, (stem, stem.replace("-idx3", ".idx3")))
        if path is None:
            raise BenchError(f"MNIST file {stem} not found in {data_dir} (expected {expected})")
        arr = read_idx(path)
        if arr.ndim != 3 or arr.shape[1:] != (28, 28) or arr.dtype != np.uint8:
            raise BenchError(f"{path}: expected uint8 images of shape (N, 28, 28), got "
                             f"{arr.dtype} {arr.shape}")
        out.append(torch.from_numpy(arr.reshape(len(arr), 784).astype(np.float32) / 255.0))
    return out[0], out[1]


# ---------------------------------------------------------------------------------- CIFAR-10
CIFAR_TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR_TEST_FILES = ["test_batch.bin"]
_CIFAR_RECORD = 1 + 3 * 32 * 32
# Per-channel mean/std of the CIFAR-10 training set (a widely used normalisation).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def read_cifar_batch(path: str | Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes,
    32×32 each), compressed if its name says so (:func:`read_bytes`). Returns uint8 images
    ``(N, 3, 32, 32)`` and int64 labels."""
    path = Path(path)
    raw = read_bytes(path, "CIFAR-10 batch")
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        raise BenchError(f"{path}: {len(raw)} bytes is not a whole number of {_CIFAR_RECORD}-byte "
                         "CIFAR-10 records (truncated or corrupt file)")
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = arr[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise BenchError(f"{path}: label {labels.max()} out of range 0..9 (not a CIFAR-10 batch)")
    images = arr[:, 1:].reshape(-1, 3, 32, 32).copy()
    return torch.from_numpy(images), torch.from_numpy(labels)


def _normalise(images: Tensor) -> Tensor:
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def load_cifar10(data_dir: str | Path | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10 from the binary version (``data_batch_1.bin`` … ``data_batch_5.bin``,
    ``test_batch.bin``, each optionally compressed) in ``data_dir`` or its
    ``cifar-10-batches-bin`` subfolder; images normalised per channel. Returns ``x_train,
    y_train, x_test, y_test``."""
    names = ", ".join(CIFAR_TRAIN_FILES + CIFAR_TEST_FILES)
    if data_dir is None:
        raise BenchError(f"CIFAR-10 needs --data-dir with the binary batches ({names}), "
                         "or --synthetic for CIFAR-shaped random data")
    base = Path(data_dir)
    if (base / "cifar-10-batches-bin").is_dir():
        base = base / "cifar-10-batches-bin"
    parts = []
    for files in (CIFAR_TRAIN_FILES, CIFAR_TEST_FILES):
        xs, ys = [], []
        for name in files:
            path = find_file(base, (name,))
            if path is None:
                raise BenchError(f"CIFAR-10 file {name} not found in {base} (expected {names}, "
                                 "optionally .gz, .bz2, .xz or .zip)")
            x, y = read_cifar_batch(path)
            xs.append(x)
            ys.append(y)
        parts.append((_normalise(torch.cat(xs)), torch.cat(ys)))
    return parts[0][0], parts[0][1], parts[1][0], parts[1][1]


def synthetic_cifar(n_train: int = 10_000, n_test: int = 2_000, seed: int = 0):
    """CIFAR-shaped random data for throughput measurements only (labels carry no signal
    beyond a weak class-dependent mean shift, so losses mean little)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n_train + n_test,), generator=gen)
    shift = torch.randn(10, 3, 1, 1, generator=gen) * 0.5
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=gen) + shift[y]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ---------------------------------------------------------------------------------- digits
def load_digits_split(seed: int = 0, n_test: int = 500) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8×8 digits (1,797 images, pixels 0..16 scaled to [0, 1]), split
    by a seeded permutation into 1,297 train and 500 test examples."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BenchError("problem 'digits' needs scikit-learn: "
                         "pip install 'secant[bench]'") from None
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


# ---------------------------------------------------------------------------------- quadratic
def quadratic_deep(dim: int = 100, n_train: int = 1000, n_test: int = 1000, seed: int = 0):
    """A noisy ill-conditioned quadratic in the spirit of DeepOBS ``quadratic_deep``: Hessian
    ``H = Qᵀ diag(λ) Q`` with a random rotation ``Q``, 90 % of the eigenvalues uniform in
    [0, 1] and 10 % uniform in [30, 60]; each example is a noise vector ``x ~ N(0, I)`` and its
    loss is ``½ (θ − x)ᵀ H (θ − x)``. Returns ``H, x_train, x_test``."""
    gen = torch.Generator().manual_seed(seed)
    n_big = dim // 10
    eig = torch.cat([torch.rand(dim - n_big, generator=gen),
                     30.0 + 30.0 * torch.rand(n_big, generator=gen)])
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    h = (q.T @ torch.diag(eig.double()) @ q).float()
    h = 0.5 * (h + h.T)
    x = torch.randn(n_train + n_test, dim, generator=gen)
    return h, x[:n_train], x[n_train:]


# ---------------------------------------------------------------------------------- MNIST-1D
def load_mnist1d(n_samples: int = 5000, seed: int = 42) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-1D (Greydanus 2020) generated procedurally by the ``mnist1d`` package's
    ``make_dataset`` with its default arguments (10 one-dimensional digit templates padded,
    scaled, sheared, translated and noised into length-40 signals; 4,000 train / 1,000 test):
    no file and no download. The generator seeds numpy's and Python's global RNGs; their
    states are restored afterwards. Returns ``x_train, y_train, x_test, y_test``."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise BenchError("problem 'mnist1d' needs the mnist1d package: "
                         "pip install 'secant[bench]'") from None
    args = get_dataset_args()
    args.num_samples, args.seed = n_samples, seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.int64),
            torch.tensor(d["x_test"], dtype=torch.float32),
            torch.tensor(d["y_test"], dtype=torch.int64))
