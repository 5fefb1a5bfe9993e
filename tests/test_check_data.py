"""check-data pre-flight and the skip policy: every problem named at once, one line each, by the
same validation code the loaders use."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _repo import ROOT as REPO
from PIL import Image
from test_data import (
    SPLIT_NAMES,
    assert_same,
    fake_fashion,
    fake_lists,
    without_class_2,
    write_idx,
)

from dadh_dist.__main__ import main
from dadh_dist.config import DataConfig
from dadh_dist.data import (
    DataError,
    Dataset,
    Split,
    check_dataset,
    dataset_to_parquet,
    load_dataset,
)
from dadh_dist.data.check import duplicates
from dadh_dist.data.idx import read_idx
from dadh_dist.data.images import pixel_digests
from dadh_dist.data.splits import one_hot


def small_dataset() -> Dataset:
    """Noise images (1, 8, 8) of 10 classes: 2 queries, 2 validation and 6 database images each;
    ids 0..99 in that order; classes cycle 0..9 within each split."""
    rng = np.random.default_rng(0)
    splits, start = {}, 0
    for name, per in zip(SPLIT_NAMES, (2, 2, 6), strict=True):
        y = np.tile(np.arange(10), per)
        splits[name] = Split(rng.integers(0, 256, (len(y), 1, 8, 8), dtype=np.uint8),
                             one_hot(y, 10), np.arange(start, start + len(y), dtype=np.int64))
        start += len(y)
    return Dataset("small", **splits, multi_label=False)


def list_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="list", root=str(root), val_per_class=1, image_size=4, **kw)


def noisy_jpeg(path: Path, keep: float = 1.0) -> None:
    """A 16x16 noise JPEG; keep < 1 writes only that fraction of its bytes (a truncated file)."""
    buf = io.BytesIO()
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    raw = buf.getvalue()
    path.write_bytes(raw[: int(len(raw) * keep)])


def break_lists(root: Path) -> dict[str, str]:
    """Five different problems in a fake_lists folder: {file:line -> what the line must say}."""
    db = root / "database.txt"
    lines = db.read_text().splitlines()
    lines[2] += " 1"  # line 3: four labels where the others have three
    lines[4] = lines[4][:-1] + "2"  # line 5: a label that is not 0 or 1
    db.write_text("\n".join(lines) + "\n")
    (root / "img" / "database6.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # line 7
    noisy_jpeg(root / "img" / "database8.png", keep=0.5)  # line 9, truncated
    (root / "img" / "test1.png").unlink()  # test.txt line 2
    return {
        f"{db}:3": r"4 labels, but .*test\.txt:1 has 3",
        f"{db}:5": r"label '2' is not 0 or 1",
        f"{db}:7": r"image img/database6\.png is unreadable",
        f"{db}:9": r"image img/database8\.png is unreadable \((?i:.*truncated)",
        f"{root / 'test.txt'}:2": r"image img/test1\.png not found",
    }


def run_check(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dadh_dist", "check-data", *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def problem_lines(text: str) -> list[str]:
    """The output's lines up to the blank line before the summary."""
    return text.split("\n\n", 1)[0].splitlines()


def test_cli_names_every_problem_with_file_and_line(tmp_path):
    root = tmp_path / "l"
    fake_lists(root)
    expected = break_lists(root)
    (tmp_path / "cfg.toml").write_text(
        f'[data]\nsource = "list"\nroot = "{root}"\nval_per_class = 1\nimage_size = 4\n')
    out = run_check(["--config", str(tmp_path / "cfg.toml")])
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    lines = problem_lines(out.stdout)
    assert len(lines) == len(expected), out.stdout
    for where, what in expected.items():
        hits = [x for x in lines if x.startswith(where + ": ")]
        assert len(hits) == 1, (where, out.stdout)
        assert re.search(what, hits[0]), hits[0]
    assert "dataset: l (source list" in out.stdout
    assert out.stdout.rstrip().endswith("check-data: 5 problems found")


def test_clean_dataset_exits_0_with_summary(tmp_path, capsys):
    root = tmp_path / "l"
    fake_lists(root)
    assert main(["check-data", f"data.root={root}", "data.source=list", "data.val_per_class=1",
                 "data.image_size=4"]) == 0
    out = capsys.readouterr().out
    ds = load_dataset(list_cfg(root))
    rows = [line.split() for line in out.splitlines()]
    assert ["class", "query", "validation", "database"] in rows
    for c in range(3):  # per-class counts of each split, in the order of the header
        assert [str(c), *(str(int(s.labels[:, c].sum())) for s in ds.splits().values())] in rows
    assert ["images", "4", "3", "9"] in rows
    assert "images: 3 channels, 4 x 4; 3 classes, multi-label" in out
    assert out.rstrip().endswith("check-data: no problems found")


def test_help_and_bad_config_exit_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        main(["check-data", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m dadh_dist check-data")
    assert main(["check-data", "data.sorce=list"]) == 2
    assert "data.sorce: unknown key (did you mean source?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_loader_fails_on_the_checks_first_problem(tmp_path):
    root = tmp_path / "l"
    fake_lists(root)
    break_lists(root)
    report = check_dataset(list_cfg(root))
    with pytest.raises(DataError) as e:
        load_dataset(list_cfg(root))
    # Same code, stopped at the first barrier: the same first problem, and the rest counted.
    assert str(e.value).startswith(str(report.problems[0]) + " (and 1 more problem;")
    assert "check-data" in str(e.value)


def test_a_run_stopped_by_its_data_names_the_check_data_command_to_paste(tmp_path, capsys):
    """The hint was `python -m dadh_dist check-data --config ...`, a placeholder: it is now
    the run's own config and overrides, quoted for a shell, and pasted it lists every problem."""
    import shlex

    from dadh_dist import cli

    root = tmp_path / "my data"  # a space: the command must quote it
    fake_lists(root)
    expected = break_lists(root)
    cfg = tmp_path / "my cfg.toml"
    cfg.write_text('[data]\nsource = "list"\nval_per_class = 1\nimage_size = 4\n')
    overrides = [f"data.root={root}", "scaling.use_ray=false", "--log.run_dir", str(tmp_path)]
    assert cli.train_main(["--config", str(cfg), *overrides, "--name", "r"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(and 1 more problem; `" in err, err
    command = err.split("`")[1]
    # log.* (the run's place and name) are no data settings: left out
    assert command == shlex.join(["python", "-m", "dadh_dist", "check-data", "--config", str(cfg),
                                  *overrides[:2]])
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "dadh_dist", "check-data"]
    assert main(words[3:]) == 2
    assert len(problem_lines(capsys.readouterr().out)) == len(expected)


def test_the_hint_a_ray_run_gives_names_the_command_too_without_a_config_file():
    """Under Ray the worker's DataError reaches the driver as a ConfigError of another text."""
    from dadh_dist.config import ConfigError
    from dadh_dist.data.problems import CHECK_HINT, check_command, name_check_command

    e = ConfigError(f"worker 0: a.txt:3: bad (and 2 more problems; {CHECK_HINT}); not restarted")
    name_check_command(e, None, ["data.root=/my data"])
    assert str(e) == ("worker 0: a.txt:3: bad (and 2 more problems; `python -m dadh_dist "
                      "check-data 'data.root=/my data'` lists them all); not restarted")
    # a URI's user-info is masked
    assert check_command(None, ["data.root=s3://KEY:secret@bucket/lists",
                                "--log.run_dir", "s3://KEY:secret@bucket/runs"]) == (
        "python -m dadh_dist check-data 'data.root=s3://***@bucket/lists'")


def test_truncated_and_missing_idx_files_are_all_named(tmp_path):
    fm = tmp_path / "fm"
    fake_fashion(fm)
    x = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    write_idx(fm / "t10k-images-idx3-ubyte.gz", x, gz=False)  # plain bytes under a .gz name
    raw = (fm / "t10k-images-idx3-ubyte.gz").read_bytes()
    (fm / "t10k-images-idx3-ubyte.gz").write_bytes(raw[:-5])
    (fm / "train-labels-idx1-ubyte.gz").unlink()
    report = check_dataset(DataConfig(root=str(fm), query_per_class=1, val_per_class=1))
    assert not report.ok
    assert report.dataset is None
    text = "\n".join(report.lines())
    assert re.search(r"train-labels-idx1-ubyte\.gz: Fashion-MNIST file not found", text)
    assert re.search(r"t10k-images-idx3-ubyte\.gz: truncated IDX file: shape \(3, 4, 4\) needs "
                     r"48 data bytes, found 43", text)
    assert len(report.problems) == 2
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: .*\(and 1 more"):
        load_dataset(DataConfig(root=str(fm)))


def test_parquet_truncated_shard_bad_rows_and_images_are_all_named(tmp_path):
    shards = dataset_to_parquet(small_dataset(), tmp_path / "pq", rows_per_shard=40)
    raw = shards[1].read_bytes()
    shards[1].write_bytes(raw[: len(raw) // 2])
    table = pq.read_table(shards[2])
    labels = table.column("labels").to_pylist()
    labels[4] = labels[4] + [0]
    labels[9] = [2] + labels[9][1:]
    images = table.column("image").to_pylist()
    images[7] = images[7][:10]
    images[8] = None
    table = table.set_column(0, "image", pa.array(images, pa.binary()))
    table = table.set_column(1, "labels", pa.array(labels, pa.list_(pa.uint8())))
    pq.write_table(table, shards[2])
    report = check_dataset(DataConfig(source="parquet", root=str(tmp_path / "pq")))
    got = [str(p) for p in report.problems]
    assert len(got) == 5, got
    assert re.fullmatch(r".*part-00001\.parquet: unreadable parquet shard .*", got[0])
    shard = str(shards[2])
    assert f"{shard}: row 4: 11 labels, but {shards[0]} row 0 has 10" in got
    assert f"{shard}: row 9: labels must be 0 or 1" in got
    assert f"{shard}: row 8: image is missing (null)" in got
    assert any(p.startswith(f"{shard}: row 7: image is unreadable") for p in got)
    # The summary covers what is readable: shards 0 and 2 less their four bad rows.
    assert sum(len(s) for s in report.dataset.splits().values()) == 40 + 20 - 4


def test_skip_bad_drops_unreadable_images_the_same_way_every_time(tmp_path, capsys):
    root = tmp_path / "l"
    fake_lists(root)
    clean = load_dataset(list_cfg(root))
    (root / "img" / "database6.png").write_bytes(b"not an image")
    noisy_jpeg(root / "img" / "database8.png", keep=0.5)
    (root / "img" / "test1.png").unlink()
    with pytest.raises(DataError, match=r"test\.txt:2: image img/test1\.png not found "
                                        r"\(and 2 more problems"):
        load_dataset(list_cfg(root))

    ds = load_dataset(list_cfg(root, skip_bad=True))
    err = capsys.readouterr().err
    assert ds.skipped == 3
    assert clean.skipped == 0
    assert err.startswith("warning: data.skip_bad: skipped 3 unreadable or missing image(s): ")
    assert "test.txt:2: image img/test1.png not found" in err
    assert len(err.strip().splitlines()) == 1
    # Exactly the bad rows (ids = row in their list file) are gone; the others are untouched.
    for name, gone in (("query", {1}), ("database", {6, 8})):
        full, kept = getattr(clean, name), getattr(ds, name)
        assert set(full.ids) - set(kept.ids) <= gone
        rows = np.searchsorted(full.ids, kept.ids)
        np.testing.assert_array_equal(kept.images, full.images[rows])
        np.testing.assert_array_equal(kept.labels, full.labels[rows])
    assert len(clean.query) - len(ds.query) == 1
    lost = (len(clean.validation) + len(clean.database)) - (len(ds.validation) + len(ds.database))
    assert lost == 2
    assert_same(ds, load_dataset(list_cfg(root, skip_bad=True)))

    db = root / "database.txt"
    db.write_text(db.read_text().replace(" 0 0 1\n", " 0 0 1 0\n", 1))
    with pytest.raises(DataError, match=r"database\.txt:\d+: 4 labels"):
        load_dataset(list_cfg(root, skip_bad=True))  # a structural problem is never skipped


def test_skip_bad_on_parquet_rows(tmp_path, capsys):
    full = small_dataset()
    shards = dataset_to_parquet(full, tmp_path / "pq")
    table = pq.read_table(shards[0])
    images = table.column("image").to_pylist()
    bad = [25, 70]  # a validation row and a database row
    for r in bad:
        images[r] = b"\x89PNG garbage"
    pq.write_table(table.set_column(0, "image", pa.array(images, pa.binary())), shards[0])
    cfg = DataConfig(source="parquet", root=str(tmp_path / "pq"))
    with pytest.raises(DataError, match=r"part-00000\.parquet: row 25: image is unreadable"):
        load_dataset(cfg)
    cfg.skip_bad = True
    ds = load_dataset(cfg)
    assert ds.skipped == 2
    assert "row 25" in capsys.readouterr().err
    assert (len(ds.query), len(ds.validation), len(ds.database)) == (20, 19, 59)
    kept = np.concatenate([s.ids for s in ds.splits().values()])
    np.testing.assert_array_equal(kept, np.setdiff1d(np.arange(100), bad))
    for name in SPLIT_NAMES:
        got, src = getattr(ds, name), getattr(full, name)
        np.testing.assert_array_equal(got.images, src.images[np.isin(src.ids, got.ids)])
    assert_same(ds, load_dataset(cfg))


def test_empty_class_missing_split_and_overlap_are_named(tmp_path):
    root = tmp_path / "l"
    fake_lists(root)
    db = root / "database.txt"
    good = db.read_text()
    db.write_text(without_class_2(good))
    report = check_dataset(list_cfg(root))
    assert [str(p) for p in report.problems] == [f"{db}: class 2 has no database image"]

    db.write_text(good + "img/test3.png 1 0 0\n")
    got = [str(p) for p in check_dataset(list_cfg(root)).problems]
    assert len(got) == 1
    assert re.fullmatch(rf"{re.escape(str(db))}:\d+: image img/test3\.png is also listed in "
                        rf"{re.escape(str(root / 'test.txt'))}:4; .*disjoint", got[0])

    db.unlink()
    (root / "test.txt").unlink()
    got = [str(p) for p in check_dataset(list_cfg(root)).problems]
    assert got == [f"{root / 'test.txt'}: query list not found",
                   f"{root}: neither database.txt nor train.txt found"]


def test_fashion_class_without_images_is_named(tmp_path):
    fm = tmp_path / "fm"
    fake_fashion(fm)
    for part in ("train", "t10k"):
        path = fm / f"{part}-labels-idx1-ubyte.gz"
        y = read_idx(path)
        y[y == 3] = 4
        write_idx(path, y.astype(np.uint8))
    report = check_dataset(DataConfig(root=str(fm), query_per_class=1, val_per_class=1))
    assert [str(p) for p in report.problems] == [f"{fm} (fashion_mnist): class 3 has no images"]



def test_parquet_missing_split_and_empty_class_are_named(tmp_path):
    (shard,) = dataset_to_parquet(small_dataset(), tmp_path / "pq")
    table = pq.read_table(shard)
    split = ["database" if s == "validation" else s for s in table.column("split").to_pylist()]
    labels = [lab[:3] + [0, lab[3] or lab[4]] + lab[5:] if s == "database" else lab
              for lab, s in zip(table.column("labels").to_pylist(), split, strict=True)]
    table = table.set_column(1, "labels", pa.array(labels, pa.list_(pa.uint8())))
    pq.write_table(table.set_column(2, "split", pa.array(split, pa.string())), shard)
    report = check_dataset(DataConfig(source="parquet", root=str(tmp_path / "pq")))
    assert [str(p) for p in report.problems] == [
        f"{tmp_path / 'pq'}: no validation rows in any shard",
        f"{tmp_path / 'pq'}: class 3 has no database image",
    ]


# ------------------------------------------------------------------ pixel-identical across splits

def duplicate_lines(report) -> list[str]:
    return [line for line in report.lines() if line.startswith("duplicates: ")]


def noise_lists(root: Path) -> np.ndarray:
    """A list folder of 8x8 RGB noise PNGs, 2 classes: test.txt 4 rows, val.txt 2, database.txt
    6 (image files q0.., v0.., d0..); returns the images (12, 8, 8, 3) in that order."""
    (root / "img").mkdir(parents=True)
    x = np.random.default_rng(7).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    k = 0
    for name, stem, n in (("test", "q", 4), ("val", "v", 2), ("database", "d", 6)):
        lines = []
        for i in range(n):
            Image.fromarray(x[k]).save(root / "img" / f"{stem}{i}.png")
            lines.append(f"img/{stem}{i}.png {i % 2} {1 - i % 2}")
            k += 1
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return x


def test_list_duplicates_across_splits_are_reported_by_id(tmp_path):
    root = tmp_path / "l"
    x = noise_lists(root)
    cfg = DataConfig(source="list", root=str(root), image_size=8)
    assert duplicate_lines(check_dataset(cfg)) == [
        "duplicates: no query or validation image is pixel-identical to a database image, nor a "
        "query image to a validation image"]
    # Planted: query rows 1 and 3 = database rows 4 and 0 (one as a BMP: pixels, not bytes,
    # count), validation row 0 = database row 2, query row 2 = validation row 1.
    Image.fromarray(x[6 + 4]).save(root / "img" / "q1.png")
    Image.fromarray(x[6 + 0]).save(root / "img" / "q3.bmp")
    (root / "test.txt").write_text((root / "test.txt").read_text().replace("q3.png", "q3.bmp"))
    Image.fromarray(x[6 + 2]).save(root / "img" / "v0.png")
    Image.fromarray(x[5]).save(root / "img" / "q2.png")
    report = check_dataset(cfg)
    assert report.ok  # a warning in the summary, not a problem
    assert duplicate_lines(report) == [
        "duplicates: 2 query images are pixel-identical to database images (query id 1 = "
        "database id 4, query id 3 = database id 0)",
        "duplicates: 1 validation image is pixel-identical to database images (validation id 0 "
        "= database id 2)",
        "duplicates: 1 query image is pixel-identical to validation images (query id 2 = "
        "validation id 1)",
    ]
    assert all(s.digests is None for s in load_dataset(cfg).splits().values())  # training: none


def test_parquet_duplicates_found_from_digests_kept_while_scanning(tmp_path):
    ds = small_dataset()  # ids: query 0..19, validation 20..39, database 40..99
    for q, d in ((3, 7), (5, 7), (11, 59), (12, 0), (19, 30)):  # four to the database, at most
        ds.query.images[q] = ds.database.images[d]             # three named
    (shard,) = dataset_to_parquet(ds, tmp_path / "pq")
    cfg = DataConfig(source="parquet", root=str(tmp_path / "pq"))
    report = check_dataset(cfg)
    # the scan kept no pixels, only digests, and those of the pixels a run decodes
    assert report.dataset.database.images.strides[0] == 0
    loaded = load_dataset(cfg)
    for name, s in report.dataset.splits().items():
        np.testing.assert_array_equal(s.digests, pixel_digests(getattr(loaded, name).images))
    assert duplicate_lines(report) == [
        "duplicates: 5 query images are pixel-identical to database images (query id 3 = "
        "database id 47, query id 5 = database id 47, query id 11 = database id 99, ...)"]
    # database_limit keeps each kept row's digest with it
    limited = check_dataset(DataConfig(source="parquet", root=str(tmp_path / "pq"),
                                       database_limit=30, seed=1)).dataset.database
    full = report.dataset.database
    np.testing.assert_array_equal(limited.digests,
                                  full.digests[np.searchsorted(full.ids, limited.ids)])


def test_in_memory_duplicates_hash_the_rows_and_digits_holds_none():
    ds = small_dataset()
    ds.validation.images[4] = ds.database.images[9]
    assert duplicates(ds) == ["duplicates: 1 validation image is pixel-identical to database "
                              "images (validation id 24 = database id 49)"]
    # scikit-learn's digits: all 1,797 images differ, so no split shares one
    report = check_dataset(DataConfig(source="digits", query_per_class=10, val_per_class=10))
    assert len(np.unique(np.concatenate([pixel_digests(s.images)
                                         for s in report.dataset.splits().values()]))) == 1797
    assert duplicate_lines(report) == [
        "duplicates: no query or validation image is pixel-identical to a database image, nor a "
        "query image to a validation image"]


def test_a_trained_run_whose_data_went_bad_names_check_data_of_the_runs_config(tmp_path, capsys):
    """evaluate and encode read the run's own dataset: their hint names the run's config.toml
    (with the data.root that --data-root moved it to), and pasted it lists every problem."""
    import shlex
    from types import SimpleNamespace

    from dadh_dist import inference
    from dadh_dist.config import Config

    root, moved = tmp_path / "lists", tmp_path / "moved here"
    fake_lists(root)
    expected = break_lists(root)
    saved = tmp_path / "run" / "config.toml"
    saved.parent.mkdir()
    saved.write_text(Config(data=list_cfg(root)).to_toml())
    for where, tail in [(root, []), (moved, [f"data.root={moved}"])]:
        if where == moved:
            root.rename(moved)
        hf = SimpleNamespace(cfg=Config(data=list_cfg(where)), run_folder=saved.parent)
        with pytest.raises(DataError) as e:
            inference.run_dataset(hf)
        command = str(e.value).split("`")[1]
        assert command == shlex.join(["python", "-m", "dadh_dist", "check-data", "--config",
                                      str(saved), *tail]), str(e.value)
        assert main(shlex.split(command)[3:]) == 2
        assert len(problem_lines(capsys.readouterr().out)) == len(expected)
    # no config.toml beside the checkpoint: the hint keeps its placeholder, naming no wrong file
    saved.unlink()
    with pytest.raises(DataError, match=r"`python -m dadh_dist check-data --config \.\.\.`"):
        inference.run_dataset(hf)
