"""Data sources: split sizes and disjointness, reproducibility, file formats, and error messages."""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dadh_dist.config import DataConfig
from dadh_dist.data import DataError, Dataset, Split, check_root, dataset_to_parquet, load_dataset
from dadh_dist.data.cifar import load_cifar10
from dadh_dist.data.fashion import find_fashion_mnist, read_fashion_mnist
from dadh_dist.data.grids import grid_splits
from dadh_dist.data.idx import read_idx

SPLIT_NAMES = ("query", "validation", "database")


def digits(**kw) -> Dataset:
    return load_dataset(DataConfig(source="digits", query_per_class=10, val_per_class=10, **kw))


def assert_disjoint(ds: Dataset) -> None:
    ids = [set(s.ids.tolist()) for s in ds.splits().values()]
    assert sum(len(i) for i in ids) == sum(len(s) for s in ds.splits().values())  # no repeats
    assert not (ids[0] & ids[1])
    assert not (ids[0] & ids[2])
    assert not (ids[1] & ids[2])


def assert_same(a: Dataset, b: Dataset) -> None:
    for name in SPLIT_NAMES:
        sa, sb = getattr(a, name), getattr(b, name)
        np.testing.assert_array_equal(sa.images, sb.images)
        np.testing.assert_array_equal(sa.labels, sb.labels)
        np.testing.assert_array_equal(sa.ids, sb.ids)


# ---------------------------------------------------------------- digits, splits, database_limit

def test_digits_read_from_scikit_learns_table_equal_its_loader_without_importing_it(
        monkeypatch):
    import sys

    from sklearn.datasets import load_digits as sk_load_digits

    from dadh_dist.data import digits as digits_mod

    ref = sk_load_digits()
    for where in (digits_mod.DIGITS_FILE, ("datasets", "data", "moved.csv.gz")):  # 2nd: fallback
        monkeypatch.setattr(digits_mod, "DIGITS_FILE", where)
        images, labels = digits_mod.digits_arrays()
        assert images.dtype == ref.images.dtype and labels.dtype == np.int64
        np.testing.assert_array_equal(images, ref.images)
        np.testing.assert_array_equal(labels, ref.target)
    # a fresh process loads the debug data without scikit-learn's import (~1.5 s of CPU)
    probe = ("import sys; from dadh_dist.data.digits import digits_arrays; "
             "images, _ = digits_arrays(); assert images.shape == (1797, 8, 8); "
             "print(sorted(m for m in sys.modules if m.startswith('sklearn')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_digits_split_sizes_disjoint_and_reproducible():
    ds = digits()
    assert (len(ds.query), len(ds.validation), len(ds.database)) == (100, 100, 1597)
    assert ds.database.images.shape == (1597, 1, 8, 8)
    assert ds.database.images.dtype == np.uint8
    assert ds.database.images.max() == 255  # 16 * 16 clipped
    assert (ds.num_classes, ds.channels, ds.image_size, ds.multi_label) == (10, 1, 8, False)
    np.testing.assert_array_equal(ds.query.labels.sum(0), [10] * 10)
    np.testing.assert_array_equal(ds.validation.labels.sum(0), [10] * 10)
    for s in ds.splits().values():
        assert s.labels.dtype == np.uint8
        assert (s.labels.sum(1) == 1).all()
    assert_disjoint(ds)
    assert sorted(np.concatenate([s.ids for s in ds.splits().values()])) == list(range(1797))
    assert_same(ds, digits())
    other = digits(seed=1)
    assert not np.array_equal(ds.query.ids, other.query.ids)


def test_class_too_small_leads_with_the_key_and_names_the_class():
    # digit 0 has 178 images, fewer than 170 + 10 + 1; so have 4 other digits
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(source="digits", query_per_class=170, val_per_class=10))
    assert str(e.value).startswith("data.query_per_class: class 0 of digits has 178 images, "
                                   "fewer than query_per_class + val_per_class + 1 = 181 (and 4 "
                                   "more problems;")


def test_database_limit_keeps_a_seeded_subset():
    full, small = digits(), digits(database_limit=300)
    assert len(small.database) == 300
    assert set(small.database.ids) <= set(full.database.ids)
    np.testing.assert_array_equal(small.query.ids, full.query.ids)
    rows = np.searchsorted(full.database.ids, small.database.ids)
    np.testing.assert_array_equal(small.database.images, full.database.images[rows])
    np.testing.assert_array_equal(small.database.ids, digits(database_limit=300).database.ids)
    assert not np.array_equal(small.database.ids,
                              digits(database_limit=300, seed=1).database.ids)


def test_unknown_source_and_negative_seed():
    with pytest.raises(DataError, match=r"data\.source"):
        load_dataset(DataConfig(source="mnist"))
    with pytest.raises(DataError, match=r"data\.seed"):
        load_dataset(DataConfig(source="digits", seed=-1, query_per_class=1, val_per_class=1))


# ------------------------------------------------------------------------------------ IDX files

def write_idx(path, a: np.ndarray, gz: bool = True) -> None:
    code = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C}[a.dtype.newbyteorder(">")
                                                         if a.dtype.itemsize > 1 else a.dtype]
    raw = bytes([0, 0, code, a.ndim]) + np.array(a.shape, ">u4").tobytes()
    raw += a.astype(a.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_idx_header_beyond_any_file_and_float_labels_are_named(tmp_path):
    (tmp_path / "x").write_bytes(bytes([0, 0, 0x08, 4]) + (65536).to_bytes(4, "big") * 4)
    with pytest.raises(DataError, match=r"x: truncated IDX file: shape \(65536, 65536, 65536, "
                                        r"65536\) needs 18446744073709551616 data bytes, found 0"):
        read_idx(tmp_path / "x")
    fm = tmp_path / "fm"
    fake_fashion(fm)
    y = read_idx(fm / "train-labels-idx1-ubyte.gz").astype(">f4")
    raw = bytes([0, 0, 0x0D, 1]) + np.array(y.shape, ">u4").tobytes() + y.tobytes()
    (fm / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: expected integer class "
                                        r"labels, got float32"):
        load_dataset(DataConfig(root=str(fm), query_per_class=1, val_per_class=1))


def test_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    v = rng.integers(-(2**31), 2**31, (7,), dtype=np.int64).astype(np.int32)
    write_idx(tmp_path / "x.gz", x)
    write_idx(tmp_path / "v", v, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), x)
    got = read_idx(tmp_path / "v")
    assert got.dtype == np.int32
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, v)


def test_idx_truncated_or_corrupt_names_the_file(tmp_path):
    x = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "raw-idx3-ubyte", x, gz=False)
    raw = (tmp_path / "raw-idx3-ubyte").read_bytes()
    (tmp_path / "cut-idx3-ubyte").write_bytes(raw[:-7])
    with pytest.raises(DataError, match=r"cut-idx3-ubyte: truncated IDX file.*needs 60.*found 53"):
        read_idx(tmp_path / "cut-idx3-ubyte")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(DataError, match=r"cut\.gz: corrupt gzip"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "magic.gz").write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
    with pytest.raises(DataError, match=r"magic\.gz: not an IDX file"):
        read_idx(tmp_path / "magic.gz")


# --------------------------------------------------------------------------------- Fashion-MNIST

def fake_fashion(folder, n_train: int = 6, n_test: int = 3):
    """IDX files with n_train / n_test images per class (10 classes) of 4x4 pixels in 1..255."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    pooled = []
    for part, per in (("train", n_train), ("t10k", n_test)):
        y = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per))
        x = rng.integers(1, 256, (len(y), 4, 4), dtype=np.uint8)
        write_idx(folder / f"{part}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", y)
        pooled.append((x, y))
    return np.concatenate([x for x, _ in pooled]), np.concatenate([y for _, y in pooled])


def test_fashion_from_folder_pools_train_and_test(tmp_path):
    x, y = fake_fashion(tmp_path / "fm")
    cfg = DataConfig(root=str(tmp_path / "fm"), query_per_class=2, val_per_class=2)
    ds = load_dataset(cfg)
    assert (len(ds.query), len(ds.validation), len(ds.database)) == (20, 20, 50)
    assert_disjoint(ds)
    for s in ds.splits().values():
        np.testing.assert_array_equal(s.images[:, 0], x[s.ids])
        np.testing.assert_array_equal(s.labels.argmax(1), y[s.ids])
    assert_same(ds, load_dataset(cfg))


def test_fashion_missing_file_and_missing_package(tmp_path, monkeypatch):
    fake_fashion(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: Fashion-MNIST file not"):
        load_dataset(DataConfig(root=str(tmp_path / "fm")))
    monkeypatch.setenv("PATH", str(tmp_path))  # no dpkg on the PATH
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        find_fashion_mnist()


def _has_fashion_package() -> bool:
    try:
        return subprocess.run(["dpkg", "-s", "dataset-fashion-mnist"],
                              capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not _has_fashion_package(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian_package():
    assert (find_fashion_mnist() / "train-images-idx3-ubyte.gz").is_file()
    ds = load_dataset(DataConfig())
    assert (len(ds.query), len(ds.validation), len(ds.database)) == (1000, 1000, 68000)
    assert ds.database.images.shape == (68000, 1, 28, 28)
    np.testing.assert_array_equal(ds.query.labels.sum(0), [100] * 10)
    np.testing.assert_array_equal(ds.database.labels.sum(0), [6800] * 10)
    ids = np.concatenate([s.ids for s in ds.splits().values()])
    np.testing.assert_array_equal(np.sort(ids), np.arange(70000))
    # The first training image and the first test image are both ankle boots (class 9).
    for first in (0, 60000):
        for s in ds.splits().values():
            if first in s.ids:
                assert s.labels[list(s.ids).index(first)].argmax() == 9


# ------------------------------------------------------------------------------------------ grids

def test_grids_labels_are_tile_unions_and_pools_are_disjoint():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(10), 30)
    x = rng.integers(1, 256, (300, 1, 4, 4), dtype=np.uint8)  # no black pixels in any tile
    g = grid_splits(x, y, query=20, validation=10, database=60, seed=3, num_classes=10)
    used = {}
    for name, n in zip(SPLIT_NAMES, (20, 10, 60), strict=True):
        gi = g[name]
        assert gi.images.shape == (n, 1, 8, 8)
        assert gi.labels.shape == (n, 10)
        n_tiles = (gi.tiles >= 0).sum(1)
        assert n_tiles.min() >= 1
        assert n_tiles.max() <= 3
        for k in range(n):
            rebuilt = np.zeros((1, 8, 8), np.uint8)
            label = np.zeros(10, np.uint8)
            for cell, src in enumerate(gi.tiles[k]):
                if src >= 0:
                    r, c = divmod(cell, 2)
                    rebuilt[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = x[src]
                    label[y[src]] = 1
            np.testing.assert_array_equal(gi.images[k], rebuilt)
            np.testing.assert_array_equal(gi.labels[k], label)
        used[name] = gi.tiles[gi.tiles >= 0]
    assert set(np.concatenate([(g[n].tiles >= 0).sum(1) for n in SPLIT_NAMES])) == {1, 2, 3}
    assert len(set(used["query"])) == len(used["query"])  # no query tile repeats
    assert not set(used["query"]) & set(used["database"])
    assert not set(used["query"]) & set(used["validation"])
    assert not set(used["validation"]) & set(used["database"])
    again = grid_splits(x, y, query=20, validation=10, database=60, seed=3, num_classes=10)
    other = grid_splits(x, y, query=20, validation=10, database=60, seed=4, num_classes=10)
    np.testing.assert_array_equal(again["database"].images, g["database"].images)
    assert not np.array_equal(other["database"].tiles, g["database"].tiles)


def test_grid_source_sizes(tmp_path):
    fake_fashion(tmp_path / "fm", n_train=20, n_test=5)
    cfg = DataConfig(source="fashion_mnist_grid", root=str(tmp_path / "fm"), query_per_class=2,
                     val_per_class=1, grid_count=40)
    ds = load_dataset(cfg)
    assert (len(ds.query), len(ds.validation), len(ds.database)) == (20, 10, 40)
    assert ds.multi_label
    assert ds.database.images.shape == (40, 1, 8, 8)
    assert (ds.database.labels.sum(1) >= 1).all()
    assert (ds.database.labels.sum(1) <= 3).all()
    assert_disjoint(ds)
    assert_same(ds, load_dataset(cfg))


def test_grid_pool_too_small_leads_with_the_key(tmp_path):
    fm = tmp_path / "fm"
    fake_fashion(fm)  # 9 images per class; 3 * (2 + 1) + 1 = 10 tiles needed
    cfg = DataConfig(source="fashion_mnist_grid", root=str(fm), query_per_class=2,
                     val_per_class=1, grid_count=4)
    with pytest.raises(DataError, match=r"^data\.query_per_class: class 0 of .*fm "
                                        r"\(fashion_mnist_grid\) has 9 images, fewer than 3 tiles "
                                        r"\* \(query_per_class \+ val_per_class\) \+ 1 = 10 \(and "
                                        r"9 more problems"):
        load_dataset(cfg)


# --------------------------------------------------------------------------------------- CIFAR-10

def fake_cifar(folder, per_class: int = 3, protocol: int | None = None) -> np.ndarray:
    folder.mkdir()
    rng = np.random.default_rng(4)
    rows = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).tolist()
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f,
                        protocol=protocol)
        rows.append(data)
    return np.concatenate(rows)


def test_cifar_folder(tmp_path):
    data = fake_cifar(tmp_path / "cifar-10-batches-py")
    cfg = DataConfig(source="cifar10", root=str(tmp_path / "cifar-10-batches-py"),
                     query_per_class=2, val_per_class=2)
    ds = load_dataset(cfg)
    assert (len(ds.query), len(ds.validation), len(ds.database)) == (20, 20, 140)
    assert ds.query.images.shape == (20, 3, 32, 32)
    assert_disjoint(ds)
    k = ds.query.ids[0]
    # channel 1 (green) row 0 is bytes 1024..1055 of the source row
    np.testing.assert_array_equal(ds.query.images[0, 1, 0], data[k, 1024:1056])


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_batches_rewritten_by_python3_load(tmp_path, protocol):
    """Subsets re-saved with pickle protocol 2 (bytes as _codecs.encode) or 5 (numpy's
    _frombuffer) hold nothing beyond tensors' data and still load."""
    data = fake_cifar(tmp_path / "c", protocol=protocol)
    ds = load_dataset(DataConfig(source="cifar10", root=str(tmp_path / "c"), query_per_class=2,
                                 val_per_class=2))
    np.testing.assert_array_equal(ds.query.images[0].reshape(-1), data[ds.query.ids[0]])


def test_cifar_errors_name_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    fake_cifar(folder)
    cfg = DataConfig(source="cifar10", root=str(folder), query_per_class=1, val_per_class=1)
    (folder / "data_batch_2").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_2: unreadable CIFAR-10 pickle"):
        load_dataset(cfg)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(os.getcwd, f)  # any global outside numpy is refused, not called
    with pytest.raises(DataError, match=r"data_batch_2: .*refusing to load"):
        load_dataset(cfg)
    (folder / "data_batch_2").unlink()
    with pytest.raises(DataError, match="data_batch_2: CIFAR-10 batch file not found"):
        load_dataset(cfg)
    # through load_dataset (a worker's path) the missing folder is named by its setting ...
    with pytest.raises(DataError, match=r"^data.root: .*nowhere does not exist \(data.source = "
                                        "cifar10 reads the cifar-10-batches-py files"):
        load_dataset(DataConfig(source="cifar10", root=str(tmp_path / "nowhere")))
    # ... and a direct call of the loader still says what it looked for
    with pytest.raises(DataError, match="nowhere: CIFAR-10 folder not found"):
        load_cifar10(DataConfig(source="cifar10", root=str(tmp_path / "nowhere")))


# ------------------------------------------------------------------------------------ list files

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 50)]


def fake_lists(root, n_db: int = 12, val: bool = False) -> dict[str, list[tuple]]:
    """Solid-colour PNGs of varying sizes; labels over 3 classes, some rows multi-label."""
    (root / "img").mkdir(parents=True)
    rows: dict[str, list[tuple]] = {}
    counts = {"test": 4, "database": n_db, **({"val": 3} if val else {})}
    k = 0
    for name, n in counts.items():
        rows[name] = []
        for i in range(n):
            colour = COLOURS[k % 4]
            path = f"img/{name}{i}.png"
            if k % 5 == 4:  # a grayscale image, decoded to three equal channels
                colour = (90, 90, 90)
                Image.new("L", (5 + i, 7), 90).save(root / path)
            else:
                Image.new("RGB", (5 + i, 7), colour).save(root / path)
            label = [(k + j) % 3 == 0 for j in range(3)]
            label[2] = label[2] or k % 4 == 1  # multi-label rows
            rows[name].append((path, [int(v) for v in label], colour))
            k += 1
        text = "\n".join(p + " " + " ".join(map(str, lab)) for p, lab, _ in rows[name])
        (root / f"{name}.txt").write_text(text + "\n\n")
    return rows


def without_class_2(text: str) -> str:
    """A fake_lists list file with class 2 emptied: its images go to class 0 (each image needs a
    class)."""
    out = []
    for line in text.splitlines():
        if line:
            path, *labels = line.split()
            if labels[2] == "1" and "1" not in labels[:2]:
                labels[0] = "1"
            out.append(" ".join([path, *labels[:2], "0"]) + "\n")
    return "".join(out)


def test_list_files_multi_label_with_held_out_validation(tmp_path):
    rows = fake_lists(tmp_path / "l")
    cfg = DataConfig(source="list", root=str(tmp_path / "l"), val_per_class=1, image_size=4)
    ds = load_dataset(cfg)
    assert (len(ds.query), len(ds.validation), len(ds.database)) == (4, 3, 9)
    assert ds.multi_label
    assert ds.num_classes == 3
    assert ds.query.images.shape == (4, 3, 4, 4)
    for s, src in ((ds.query, rows["test"]), (ds.validation, rows["database"]),
                   (ds.database, rows["database"])):
        for img, lab, i in zip(s.images, s.labels, s.ids, strict=True):
            _path, label, colour = src[i]
            np.testing.assert_array_equal(lab, label)
            np.testing.assert_array_equal(img, np.broadcast_to(np.array(colour)[:, None, None],
                                                               (3, 4, 4)))
    assert not set(ds.validation.ids) & set(ds.database.ids)
    assert_same(ds, load_dataset(cfg))


def test_list_hold_out_too_large_leads_with_the_key(tmp_path):
    fake_lists(tmp_path / "l")  # 12 database rows, 3 classes
    cfg = DataConfig(source="list", root=str(tmp_path / "l"), val_per_class=4, image_size=4)
    with pytest.raises(DataError) as e:
        load_dataset(cfg)
    assert str(e.value) == (f"data.val_per_class: {tmp_path / 'l' / 'database.txt'} has 12 rows, "
                            "too few to hold out val_per_class * classes = 12 validation rows")


def test_list_files_with_val_txt_and_train_txt(tmp_path):
    fake_lists(tmp_path / "l", val=True)
    (tmp_path / "l" / "database.txt").rename(tmp_path / "l" / "train.txt")
    ds = load_dataset(DataConfig(source="list", root=str(tmp_path / "l"), image_size=3))
    assert (len(ds.query), len(ds.validation), len(ds.database)) == (4, 3, 12)


def test_list_file_errors_name_file_and_line(tmp_path):
    root = tmp_path / "l"
    fake_lists(root)
    cfg = DataConfig(source="list", root=str(root), val_per_class=1, image_size=4)
    db = root / "database.txt"
    good = db.read_text()
    lines = good.splitlines()
    clean = load_dataset(cfg)
    image6 = (root / "img" / "database6.png").read_bytes()

    db.write_text("\n".join([*lines[:2], lines[2] + " 1", *lines[3:]]))
    with pytest.raises(DataError, match=r"database\.txt:3: 4 labels, but .*test\.txt:1 has 3"):
        load_dataset(cfg)
    db.write_text("\n".join([*lines[:4], lines[4][:-1] + "2", *lines[5:]]))
    with pytest.raises(DataError, match=r"database\.txt:5: label '2' is not 0 or 1"):
        load_dataset(cfg)
    db.write_text(good)
    (root / "img" / "database6.png").unlink()
    with pytest.raises(DataError, match=r"database\.txt:7: image img/database6\.png not found"):
        load_dataset(cfg)
    (root / "img" / "database6.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"database\.txt:7: image img/database6\.png is unread"):
        load_dataset(cfg)
    db.write_text(without_class_2(good))
    with pytest.raises(DataError, match=r"database\.txt: class 2 has no database image"):
        load_dataset(cfg)
    db.write_text(good + (root / "test.txt").read_text())
    shared = r"database\.txt:\d+: image img/test\d\.png is also listed in .*test\.txt:\d"
    with pytest.raises(DataError, match=shared):
        load_dataset(cfg)
    # the same image spelt another way, listed twice, a row without a class, a byte-order mark
    (root / "img" / "database6.png").write_bytes(image6)
    db.write_text(good + "./img//x/../test0.png 1 0 0\n")
    with pytest.raises(DataError, match=r"database\.txt:\d+: image \./img//x/\.\./test0\.png is "
                                        r"also listed in .*test\.txt:1;"):
        load_dataset(cfg)
    db.write_text(good + lines[0] + "\n")
    with pytest.raises(DataError, match=rf"database\.txt:{len(lines) + 1}: image "
                                        r"img/database0\.png is listed again \(line 1\)"):
        load_dataset(cfg)
    db.write_text(good.replace(lines[3], lines[3].split()[0] + " 0 0 0"))
    with pytest.raises(DataError, match=r"database\.txt:4: no label is 1"):
        load_dataset(cfg)
    db.write_bytes(b"\xef\xbb\xbf" + good.encode())
    assert_same(load_dataset(cfg), clean)


# ---------------------------------------------------------------------------------------- parquet

def test_parquet_round_trip_gray_and_rgb(tmp_path):
    ds = digits()
    shards = dataset_to_parquet(ds, tmp_path / "pq", rows_per_shard=500)
    assert [p.name for p in shards] == [f"part-0000{i}.parquet" for i in range(4)]
    back = load_dataset(DataConfig(source="parquet", root=str(tmp_path / "pq")))
    assert_same(ds, back)
    assert (back.name, back.multi_label, back.channels) == ("digits", False, 1)

    fake_lists(tmp_path / "l")
    rgb = load_dataset(DataConfig(source="list", root=str(tmp_path / "l"), val_per_class=1,
                                  image_size=4))
    dataset_to_parquet(rgb, tmp_path / "pq_rgb", rows_per_shard=7)
    back = load_dataset(DataConfig(source="parquet", root=str(tmp_path / "pq_rgb")))
    assert_same(rgb, back)
    assert back.multi_label
    assert back.channels == 3
    resized = load_dataset(DataConfig(source="parquet", root=str(tmp_path / "pq_rgb"),
                                      image_size=2))
    assert resized.database.images.shape == (9, 3, 2, 2)
    with pytest.raises(DataError, match="already holds parquet shards"):
        dataset_to_parquet(rgb, tmp_path / "pq_rgb")


def test_parquet_corrupt_shard_and_bad_row_are_named(tmp_path):
    ds = digits()
    shards = dataset_to_parquet(ds, tmp_path / "pq", rows_per_shard=1000)
    raw = shards[1].read_bytes()
    shards[1].write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"part-00001\.parquet: unreadable parquet shard"):
        load_dataset(DataConfig(source="parquet", root=str(tmp_path / "pq")))

    table = pq.read_table(shards[0])
    labels = table.column("labels").to_pylist()
    labels[5] = labels[5] + [0]
    table = table.set_column(1, "labels", pa.array(labels, pa.list_(pa.uint8())))
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(table, bad / "shard-a.parquet")
    with pytest.raises(DataError, match=r"shard-a\.parquet: row 5: 11 labels, but .* has 10"):
        load_dataset(DataConfig(source="parquet", root=str(bad)))


def test_parquet_ids_and_label_rows_are_checked(tmp_path):
    from dadh_dist.data.parquet_index import SplitIndex
    from dadh_dist.data.problems import Problems

    (shard,) = dataset_to_parquet(digits(), tmp_path / "pq", rows_per_shard=5000)
    table = pq.read_table(shard)
    split = np.array(table.column("split").to_pylist())
    db = np.flatnonzero(split == "database")
    ids = table.column("id").to_numpy().copy()
    bad = tmp_path / "bad"
    bad.mkdir()

    def refused(t, match, index=False):
        pq.write_table(t, bad / "s.parquet")
        with pytest.raises(DataError, match=match):
            if index:  # data.per_worker's reader
                idx = SplitIndex.open(bad)
                idx.read(0, idx.n, 0, Problems())
            else:
                load_dataset(DataConfig(source="parquet", root=str(bad)))

    twice = ids.copy()
    twice[db[7]] = ids[db[3]]
    refused(table.set_column(3, "id", pa.array(twice, pa.int64())),
            rf"s\.parquet: row {db[7]}: id {ids[db[3]]} is also the id of .*s\.parquet: row "
            rf"{db[3]}; ids must be unique within a split \(database\)")
    huge = ids.astype(np.uint64)
    huge[db[2]] = 2**63
    for index in (False, True):
        refused(table.set_column(3, "id", pa.array(huge, pa.uint64())),
                r"s\.parquet: column id holds 9223372036854775808, beyond int64", index)
        refused(table.set_column(3, "id", pa.array([f"img_{i}" for i in ids], pa.string())),
                r"s\.parquet: column id must be int64, got string", index)
    labels = table.column("labels").to_pylist()
    labels[db[4]] = [0] * 10
    for index in (False, True):
        refused(table.set_column(1, "labels", pa.array(labels, pa.list_(pa.uint8()))),
                rf"s\.parquet: row {db[4]}: no label is 1", index)
    # ids may repeat across splits (a list source's are row numbers per list file)
    across = ids.copy()
    across[db[0]] = ids[np.flatnonzero(split == "query")[0]]
    pq.write_table(table.set_column(3, "id", pa.array(across, pa.int64())), bad / "s.parquet")
    assert len(load_dataset(DataConfig(source="parquet", root=str(bad))).database) == len(db)


def test_database_limit_that_empties_a_class_is_refused():
    with pytest.raises(DataError, match=r"^data.database_limit: class \d has no database "
                                        r"image among the 5 kept by data.database_limit = 5 "
                                        r"\(raise it\)"):
        digits(database_limit=5)
    assert len(digits(database_limit=60).database) == 60  # 10 classes among 60: every one kept


def test_parquet_database_rows_read_by_range_equal_the_loaded_database(tmp_path):
    from dadh_dist.data.parquet_index import SplitIndex
    from dadh_dist.distributed import even_split

    ds = digits()
    # as written: query and validation rows first, so only the first shard mixes splits
    dataset_to_parquet(ds, tmp_path / "pq", rows_per_shard=500)
    # the same rows shuffled across three shards of row groups of 50: every group mixes
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "pq").iterdir())])
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    (tmp_path / "mixed").mkdir()
    for i, lo in enumerate(range(0, table.num_rows, 700)):
        pq.write_table(table.slice(lo, 700), tmp_path / "mixed" / f"s{i}.parquet",
                       row_group_size=50)
    for folder, scanned in (("pq", 1), ("mixed", 36)):
        want = load_dataset(DataConfig(source="parquet", root=str(tmp_path / folder)))
        index = SplitIndex.open(tmp_path / folder)
        assert index.n == len(want.database.labels) and index.scanned == scanned
        for W in (1, 2, 3, 7):
            got = [index.labels(r.start, r.stop)
                   for r in (even_split(index.n, W, rank) for rank in range(W))]
            assert np.array_equal(np.concatenate(got), want.database.labels), (folder, W)
        assert index.labels(5, 5).shape == (0, 10)
        with pytest.raises(ValueError, match="outside"):
            index.labels(0, index.n + 1)

    labels = table.column("labels").to_pylist()
    database = np.flatnonzero(np.array(table.column("split").to_pylist()) == "database")
    row = int(database[database >= 100][0])  # in the third row group of 50
    labels[row] = [2] + labels[row][1:]
    (tmp_path / "bad").mkdir()
    pq.write_table(table.set_column(1, "labels", pa.array(labels, pa.list_(pa.uint8()))),
                   tmp_path / "bad" / "s.parquet", row_group_size=50)
    index = SplitIndex.open(tmp_path / "bad")
    index.labels(0, int((database < 100).sum()))  # the row groups before it read
    with pytest.raises(DataError, match=rf"s\.parquet: row {row}: labels must be 0 or 1"):
        index.labels(0, index.n)
    with pytest.raises(DataError, match="parquet folder not found"):
        SplitIndex.open(tmp_path / "nowhere")
    pq.write_table(table.drop_columns(["split"]), tmp_path / "bad" / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: missing column split"):
        SplitIndex.open(tmp_path / "bad")

    # a split value that is no split, or a null, is refused as loading refuses it: in a group
    # of several values (read) and in a group of one value (its statistics), not counted as in
    # no split; the row named is the shard's, as loading names it
    splits = table.column("split").to_pylist()
    for value, message in (("train", "split 'train' is not one of"), (None, "split is null")):
        odd = list(splits)
        odd[130] = value
        folder = tmp_path / f"odd_{value}"
        folder.mkdir()
        pq.write_table(table.set_column(2, "split", pa.array(odd, pa.string())),
                       folder / "s.parquet", row_group_size=50)
        with pytest.raises(DataError, match=rf"s\.parquet: row 130: {message}"):
            SplitIndex.open(folder)
        with pytest.raises(DataError, match=rf"s\.parquet: row 130: {message}"):
            load_dataset(DataConfig(source="parquet", root=str(folder)))
    whole = table.slice(0, 60).set_column(2, "split", pa.array(["train"] * 60, pa.string()))
    pq.write_table(whole, tmp_path / "odd_train" / "s.parquet", row_group_size=50)
    with pytest.raises(DataError, match=r"s\.parquet: row 0: split 'train' is not one of"):
        SplitIndex.open(tmp_path / "odd_train")


def test_split_rejects_float_images():
    with pytest.raises(DataError, match="uint8"):
        Split(np.zeros((2, 1, 3, 3), np.float32), np.zeros((2, 4), np.uint8),
              np.arange(2, dtype=np.int64))


def test_fashion_pool_reader_matches_idx(tmp_path):
    x, y = fake_fashion(tmp_path / "fm")
    images, labels = read_fashion_mnist(tmp_path / "fm")
    np.testing.assert_array_equal(images[:, 0], x)
    np.testing.assert_array_equal(labels, y)


def test_check_root_names_the_key_and_path(tmp_path, monkeypatch):
    """The pre-flight a run makes before starting workers (dadh_dist.run.prepare_run)."""
    check_root(DataConfig(source="digits"))  # bundled: no root needed
    fake_cifar(tmp_path / "c")
    check_root(DataConfig(source="cifar10", root=str(tmp_path / "c")))
    for source in ("cifar10", "list", "parquet", "fashion_mnist_grid"):
        with pytest.raises(DataError, match=rf"^data.root: {tmp_path}/nope does not exist "
                                            rf"\(data.source = {source} reads"):
            check_root(DataConfig(source=source, root=str(tmp_path / "nope")))
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"^data.root: .*/file is not a folder"):
        check_root(DataConfig(source="list", root=str(tmp_path / "file")))
    with pytest.raises(DataError, match=r"^data.root: data.source = parquet needs a folder"):
        check_root(DataConfig(source="parquet"))
    # an empty root is Fashion-MNIST's Debian package, looked up as the loader does
    if _has_fashion_package():
        check_root(DataConfig(source="fashion_mnist"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no dpkg on the PATH
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        check_root(DataConfig(source="fashion_mnist"))


def test_a_root_set_for_a_bundled_source_is_refused_not_ignored(tmp_path):
    """digits reads no folder: a data.root the user set would silently not be their data. The
    pre-flight and the loaders (a cluster's workers) both say so; every other source reads it."""
    from dadh_dist.config import CHOICES
    from dadh_dist.data.sources import BUNDLED, ROOTS, SOURCES

    assert sorted([*BUNDLED, *ROOTS]) == sorted(SOURCES) == sorted(CHOICES["data.source"])
    cfg = DataConfig(source="digits", root=str(tmp_path))
    says = (rf"^data.root: data.source = digits reads no folder \(it uses scikit-learn's copy in "
            rf"its wheel\), but data.root = '{tmp_path}'; leave data.root empty")
    for check in (check_root, load_dataset):
        with pytest.raises(DataError, match=says):
            check(cfg)


def test_16_bit_training_images_are_scaled_not_clipped(tmp_path):
    from dadh_dist.data.images import decode

    eight = np.random.default_rng(3).integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_array_equal(decode(tmp_path / "deep.png")[0], eight)
    np.testing.assert_array_equal(decode(tmp_path / "deep.png", rgb=True),
                                  np.repeat(eight[None], 3, 0))


def test_float_training_images_are_scaled_by_their_range_not_clipped(tmp_path):
    """A float TIFF (mode F) of 0..1 is times 255 (convert("L") made it black), one of 0..255
    as it is; another range is an unreadable image, named, not a guess."""
    from dadh_dist.data.images import check_image, decode

    eight = np.random.default_rng(4).integers(0, 256, (6, 5), dtype=np.uint8)
    for name, pixels in (("unit", eight / np.float32(255)), ("eight", eight.astype(np.float32))):
        Image.fromarray(pixels.astype(np.float32)).save(tmp_path / f"{name}.tif")
        assert Image.open(tmp_path / f"{name}.tif").mode == "F"
        np.testing.assert_array_equal(decode(tmp_path / f"{name}.tif")[0], eight, err_msg=name)
        np.testing.assert_array_equal(decode(tmp_path / f"{name}.tif", 5, rgb=True),
                                      decode(tmp_path / f"{name}.tif", 5).repeat(3, 0))
    for pixels, says in (([[-1.0, 0.5]], "float pixels in -1..0.5: only 0..1 and 0..255 are read"),
                         ([[0.0, 300.0]], "float pixels in 0..300"),
                         ([[0.0, np.nan]], "float pixels that are not finite")):
        Image.fromarray(np.array(pixels, np.float32)).save(tmp_path / "odd.tif")
        image, why = check_image(tmp_path / "odd.tif")
        assert image is None and why.startswith(f"is unreadable ({says}"), why
