"""Data generators and on-disk loaders of the benchmark harness."""

import bz2
import gzip
import lzma
import math
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch

from secant.bench import data as D
from secant.bench.data import BenchError


def test_curves_deterministic_per_seed_and_in_unit_interval():
    a = D.curves_images(40, seed=3)
    b = D.curves_images(40, seed=3)
    c = D.curves_images(40, seed=4)
    assert a.shape == (40, 784) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    # chunking does not change the result
    assert torch.equal(a, D.curves_images(40, seed=3, chunk=7))


def test_curves_pass_through_their_three_points():
    n, seed = 20, 11
    imgs = D.curves_images(n, seed).view(n, 28, 28)
    pts = np.random.default_rng(seed).uniform(2.0, 25.0, size=(n, 3, 2))  # same stream
    for i in range(n):
        for x, y in pts[i]:
            # the pixel centre nearest to a defining point is within (0.5, 0.5) of the curve,
            # so its intensity is at least exp(-0.5 / (2 * 0.7**2)) for the thinnest pen
            assert imgs[i, round(y), round(x)] >= math.exp(-0.5 / (2 * 0.7**2)) - 0.03
    # thin strokes: most of the image is dark
    assert imgs.mean() < 0.2


def test_curves_dataset_split_sizes():
    assert D.CURVES_TRAIN == 20_000 and D.CURVES_TEST == 10_000


def _idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(
        f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    raw = _idx_bytes(arr)
    path = tmp_path / ("x.idx" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = D.read_idx(path)
    assert out.shape == (2, 28, 28)
    assert np.array_equal(out, arr)


def _zip(raw: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("inner", raw)
    return buf.getvalue()


def _raw_deflate(raw: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(raw) + c.flush()


COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zip": _zip}


def _corrupt(blob: bytes, start: int) -> bytes:
    b = bytearray(blob)
    for i in range(start, start + 16):
        b[i] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_read_bytes_decompresses_by_suffix(tmp_path, suffix):
    raw = bytes(range(256)) * 40
    path = tmp_path / ("f.bin" + suffix)
    path.write_bytes(COMPRESS[suffix](raw))
    assert D.read_bytes(path) == raw


@pytest.mark.parametrize("suffix, blob", [
    (".gz", _corrupt(gzip.compress(bytes(range(256)) * 40), 40)),  # body: bad CRC or data
    (".gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 50),  # zlib.error
    (".gz", gzip.compress(b"x" * 5000)[:-20]),  # truncated
    (".bz2", _corrupt(bz2.compress(bytes(range(256)) * 40), 20)),
    (".xz", _corrupt(lzma.compress(bytes(range(256)) * 40), 40)),
    (".zip", _corrupt(_zip(bytes(range(256)) * 40), 60)),  # deflated member: bad data or CRC
    (".zip", b"PK\x03\x04" + b"\x00" * 30),  # a local header and no archive
])
def test_corrupt_compressed_body_is_one_bench_error_naming_the_file(tmp_path, suffix, blob):
    path = tmp_path / ("train-images-idx3-ubyte" + suffix)
    path.write_bytes(blob)
    with pytest.raises(BenchError, match="corrupt file") as exc:
        D.read_bytes(path, "IDX file")
    assert str(path) in str(exc.value) and len(str(exc.value).splitlines()) == 1


def test_zip_of_several_files_refused(tmp_path):
    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a", b"1")
        archive.writestr("b", b"2")
    with pytest.raises(BenchError, match="a zip archive of 2 files, expected one"):
        D.read_bytes(path)


def test_read_idx_rejects_truncated_and_garbage(tmp_path):
    arr = np.zeros((3, 28, 28), dtype=np.uint8)
    path = tmp_path / "t.idx"
    path.write_bytes(_idx_bytes(arr)[:-10])
    with pytest.raises(BenchError, match="truncated"):
        D.read_idx(path)
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(BenchError, match="not an IDX file"):
        D.read_idx(path)


def test_load_mnist_from_idx_files(tmp_path):
    tr = np.full((4, 28, 28), 255, dtype=np.uint8)
    tr[1] = 51  # 51 / 255 = 0.2
    te = np.zeros((2, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(tr)))
    (tmp_path / "t10k-images-idx3-ubyte.xz").write_bytes(lzma.compress(_idx_bytes(te)))
    x_train, x_test = D.load_mnist(tmp_path)
    assert x_train.shape == (4, 784) and x_test.shape == (2, 784)
    assert x_train[0].eq(1.0).all() and torch.allclose(x_train[1], torch.full((784,), 0.2))
    assert x_test.eq(0).all()


def test_load_mnist_names_missing_files(tmp_path):
    with pytest.raises(BenchError, match="t10k-images-idx3-ubyte"):
        (tmp_path / "train-images-idx3-ubyte").write_bytes(
            _idx_bytes(np.zeros((1, 28, 28), np.uint8)))
        D.load_mnist(tmp_path)
    with pytest.raises(BenchError, match="--data-dir"):
        D.load_mnist(None)


def _cifar_records(labels, fill):
    out = bytearray()
    for lab, f in zip(labels, fill):
        out.append(lab)
        img = np.zeros((3, 32, 32), dtype=np.uint8)
        img[0], img[1], img[2] = f, (f + 1) % 256, (f + 2) % 256  # R, G, B planes
        out += img.tobytes()
    return bytes(out)


def test_read_cifar_batch_layout(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(_cifar_records([3, 9], [10, 200]))
    x, y = D.read_cifar_batch(path)
    assert y.tolist() == [3, 9]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8
    assert x[0, 0].eq(10).all() and x[0, 1].eq(11).all() and x[1, 2].eq(202).all()


def test_read_cifar_batch_rejects_truncated(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(_cifar_records([1, 2], [0, 0])[:-1])
    with pytest.raises(BenchError, match="truncated"):
        D.read_cifar_batch(path)


def test_load_cifar10_normalises_and_finds_subfolder(tmp_path):
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    for name in D.CIFAR_TRAIN_FILES + D.CIFAR_TEST_FILES:
        (base / name).write_bytes(_cifar_records([1, 2, 3], [255, 0, 100]))
    (base / "data_batch_2.bin").unlink()  # found compressed as well
    (base / "data_batch_2.bin.bz2").write_bytes(bz2.compress(_cifar_records([1, 2, 3],
                                                                            [255, 0, 100])))
    x_tr, y_tr, x_te, y_te = D.load_cifar10(tmp_path)
    assert x_tr.shape == (15, 3, 32, 32) and x_te.shape == (3, 3, 32, 32)
    assert y_tr.tolist() == [1, 2, 3] * 5
    # hand-computed: red plane of the first image is 255 -> (1 - 0.4914) / 0.2470
    assert x_tr[0, 0, 0, 0].item() == pytest.approx((1.0 - 0.4914) / 0.2470, rel=1e-6)
    with pytest.raises(BenchError, match="test_batch.bin"):
        (base / "test_batch.bin").unlink()
        D.load_cifar10(tmp_path)


def test_digits_split():
    x_tr, y_tr, x_te, y_te = D.load_digits_split()
    assert len(x_tr) == 1297 and len(x_te) == 500
    assert x_tr.min() >= 0 and x_tr.max() <= 1
    assert set(y_te.tolist()) == set(range(10))


def test_quadratic_spectrum():
    h, x_tr, x_te = D.quadratic_deep()
    eig = torch.linalg.eigvalsh(h.double())
    assert (eig[:90] >= -1e-4).all() and (eig[:90] <= 1 + 1e-4).all()
    assert (eig[90:] >= 30 - 1e-3).all() and (eig[90:] <= 60 + 1e-3).all()
    assert x_tr.shape == (1000, 100) and x_te.shape == (1000, 100)


def test_mnist1d_from_its_real_generator_without_network(monkeypatch):
    import random
    import socket

    pytest.importorskip("mnist1d")

    def no_network(*a, **k):
        raise AssertionError("mnist1d tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    np.random.seed(7)
    random.seed(7)
    before = (np.random.get_state()[1].copy(), random.getstate())
    x_tr, y_tr, x_te, y_te = D.load_mnist1d()
    assert x_tr.shape == (4000, 40) and x_te.shape == (1000, 40)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert set(y_tr.tolist()) == set(range(10)) and set(y_te.tolist()) <= set(range(10))
    assert torch.bincount(torch.cat([y_tr, y_te])).tolist() == [500] * 10  # 5000 / 10 classes
    # the package standardises the whole set to mean 0, std 1
    x = torch.cat([x_tr, x_te]).double()
    assert abs(float(x.mean())) < 1e-6 and abs(float(x.std()) - 1) < 1e-3
    # deterministic, and the global random states are left as they were
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    again = D.load_mnist1d()
    assert torch.equal(again[0], x_tr) and torch.equal(again[3], y_te)
