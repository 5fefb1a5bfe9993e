"""Using a trained hash function: evaluate, encode, search, export, and their user errors.

One debug run (digits, 16 bits, two outer iterations) is trained once for the module. Two outer
iterations leave the network's sign pattern almost constant over the images, which would let an
encoder that mixes up images pass; `centred` therefore re-centres each stream's hash layer on the
database features (bias = -W·mean feature), so that codes depend on the image.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dadh_dist import checkpoint as ckpt
from dadh_dist import cli, codesfile, config, driver, export, inference, loop, report, retrieval
from dadh_dist.data import Split, dataset_to_parquet
from dadh_dist.models import HashStream

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.toml"
ENCODERS = ("f", "g", "fg")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("runs")
    cfg = config.load(DEBUG, ["scaling.use_ray=false", f"log.run_dir={json.dumps(str(tmp))}",
                              "log.name=x"])
    return Path(driver.run_local(cfg)["run_dir"])


@pytest.fixture(scope="module")
def centred(run, tmp_path_factory) -> Path:
    """A checkpoint of the run whose hash layers are centred on the database features."""
    hf, ds = inference.load_with_data(run)
    state, manifest = ckpt.load(hf.checkpoint)
    x = torch.from_numpy(ds.database.images)
    for name in ("f", "g"):
        stream = getattr(hf, name)
        with torch.no_grad():
            mean = stream.backbone(stream.preprocess(x)).mean(0)
            stream.head.bias.copy_(-(stream.head.weight @ mean))
        state[name] = stream.state_dict()
    folder = tmp_path_factory.mktemp("centred") / "checkpoint_000002"
    ckpt.save(folder, state, hf.cfg.to_toml(), manifest["fingerprint"])
    return folder


@pytest.fixture(scope="module")
def loaded(centred):
    return inference.load_with_data(centred)


def _cli(job: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _brute_force_topk(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hamming distance from ±1 inner products, ranked by (distance, database index)."""
    d = (q.shape[1] - q.astype(np.int64) @ db.astype(np.int64).T) // 2
    order = np.stack([np.lexsort((np.arange(len(db)), row))[:k] for row in d])
    return order, np.take_along_axis(d, order, 1)


# -------------------------------------------------------------------------------------- evaluate


def test_evaluate_writes_report_and_reproduces_final_metrics(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "eval"
    assert cli.evaluate_main(["--checkpoint", str(run), "--out", str(out), "--topk", "50"]) == 0
    for name in ("pr_curve.png", "precision_at_n.png", "examples.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    result = json.loads((out / "metrics.json").read_text())
    final = json.loads((run / "final_metrics.json").read_text())
    m = result["metrics"]
    for e in ENCODERS:
        assert abs(m[f"map_all_{e}"] - final[f"map_all_{e}"]) <= 1e-9
        assert abs(m[f"p_at_1000_{e}"] - final[f"p_at_1000_{e}"]) <= 1e-9
        for key in (f"map_at_50_{e}", f"p_hamming2_{e}", f"map_tie_aware_{e}"):
            assert 0.0 <= m[key] <= 1.0
        pr = result["curves"][e]
        assert len(pr["precision"]) == 17  # radii 0..16
        assert pr["recall"][-1] == pytest.approx(1.0)  # radius k retrieves the whole database
        # at N = n every query retrieves the whole database: precision = its class's share
        assert pr["p_at_n"]["1597"] == pytest.approx(pr["precision"][-1])
    assert result["run_reported"] and result["t"] == 2
    md = (out / "report.md").read_text()
    assert "agrees with the run's own `final_metrics.json`" in md
    assert "| sign(f+g) |" in md and "](examples.png)" in md
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    scalar = acc.Scalars("eval_query/map_all_fg")[0]
    assert (scalar.step, scalar.value) == (2, pytest.approx(final["map_all_fg"]))
    assert {"eval_query/precision–recall", "eval_query/precision@N",
            "eval_query/example retrievals"} <= set(acc.Tags()["images"])


def test_evaluate_script_reports_map_at_1000_by_default(run, tmp_path):
    out = tmp_path / "eval"
    proc = _cli("evaluate", "--checkpoint", str(run), "--out", str(out), "--examples", "0",
                "--no-tensorboard")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    hf, ds = inference.load_with_data(run)
    outputs = hf.outputs(ds.query.images, list(ENCODERS))
    for e in ENCODERS:  # the debug config leaves eval.topk at 0: mAP@1000 of 1,597 images
        q = loop.query_codes(outputs, e)
        want = retrieval.mean_average_precision(q, hf.B, ds.query.labels, ds.database.labels,
                                                topk=1000)
        assert m[f"map_at_1000_{e}"] == pytest.approx(want, abs=1e-9)
        assert m[f"map_at_1000_{e}"] != pytest.approx(m[f"map_all_{e}"], abs=1e-6)
    assert "mAP@1000" in proc.stdout


def test_multi_label_report_breaks_map_down_by_labels_per_query(loaded, tmp_path):
    hf, ds = loaded
    assert report.evaluate(hf, ds, ["fg"]).by_labels == {}  # single-label: nothing to split
    labels = ds.query.labels.copy()
    two = np.arange(0, len(labels), 3)  # every third query also carries the next class
    labels[two, (labels[two].argmax(1) + 1) % labels.shape[1]] = 1
    multi = dataclasses.replace(ds, multi_label=True,
                                query=Split(ds.query.images, labels, ds.query.ids))
    ev = report.evaluate(hf, multi, ["f", "fg"], topk=50)
    counts = labels.sum(1)
    for e in ("f", "fg"):
        assert [(r["labels"], r["queries"]) for r in ev.by_labels[e]] == [
            (1, int((counts == 1).sum())), (2, len(two))]
        for r in ev.by_labels[e]:
            rows = counts == r["labels"]
            ap = retrieval.average_precision(ev.query_codes[e][rows], hf.B, labels[rows],
                                             ds.database.labels, topk=50)
            p = retrieval.precision_at_n(ev.query_codes[e][rows], hf.B, labels[rows],
                                         ds.database.labels, [ev.precision_at])
            assert r["map"] == pytest.approx(ap.mean(), abs=1e-12)
            assert r["p_at_n"] == pytest.approx(p[ev.precision_at], abs=1e-12)
    paths = report.write(tmp_path / "eval", ev, hf, multi, examples=0, tensorboard=False)
    md = paths["report.md"].read_text()
    row = ev.by_labels["fg"][1]
    assert "| labels | queries | sign(f) | sign(f+g) |" in md
    assert f"| 2 | {len(two)} | " in md and f"{row['map']:.4f} / {row['p_at_n']:.4f} |" in md
    saved = json.loads(paths["metrics.json"].read_text())["by_label_count"]
    assert saved["fg"] == ev.by_labels["fg"]


def test_examples_figure_marks_exactly_the_results_sharing_no_label(loaded):
    hf, ds = loaded
    ev = report.evaluate(hf, ds, ["fg"])
    fig = report.examples_figure(ev, hf, ds, 6, "fg")
    rows = np.unique(np.linspace(0, len(ds.query) - 1, 6).astype(int))
    order, dist = _brute_force_topk(ev.query_codes["fg"][rows], hf.B, report.TOP)
    cols = 1 + report.TOP
    wrong = []
    for r, i in enumerate(rows):
        for c in range(report.TOP):
            title = fig.axes[r * cols + 1 + c].get_title()
            assert title.startswith(f"d={dist[r, c]}")
            shares = bool((ds.query.labels[i] & ds.database.labels[order[r, c]]).any())
            assert title.endswith(" wrong") == (not shares), (r, c, title)
            wrong.append(not shares)
    assert any(wrong) and not all(wrong)  # the figure has both kinds to mark


# ---------------------------------------------------------------------------------------- encode


def test_encode_sources_agree_with_the_network(loaded, centred, tmp_path):
    hf, ds = loaded
    q = ds.query
    want = dict(zip(q.ids.tolist(), hf.codes(q.images, "fg")))
    assert len({c.tobytes() for c in want.values()}) > 20  # the codes depend on the image
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    for i, img in zip(q.ids, q.images):
        Image.fromarray(img[0]).save(folder / f"{i:04d}.png")
    listed = list(reversed(q.ids[:30].tolist()))
    (tmp_path / "list.txt").write_text("".join(f"images/nested/{i:04d}.png 0 1\n" for i in listed))
    shards = tmp_path / "shards"
    dataset_to_parquet(ds, shards, rows_per_shard=700)

    def encode(name: str, *args: str) -> codesfile.Codes:
        out = tmp_path / f"{name}.parquet"
        argv = ["--checkpoint", str(centred), "--out", str(out), "--quiet", "--batch", "16"]
        assert cli.encode_main([*argv, *args]) == 0
        return codesfile.read(out)

    runs = {
        "split": encode("split", "--split", "query"),
        "folder": encode("folder", "--images", str(tmp_path / "images")),
        "list": encode("list", "--images", str(tmp_path / "list.txt")),
        "parquet": encode("parquet", "--images", str(shards), "--parquet-split", "query"),
    }
    np.testing.assert_array_equal(runs["split"].ids, q.ids)
    np.testing.assert_array_equal(runs["parquet"].ids, q.ids)
    assert runs["folder"].ids.tolist() == [f"nested/{i:04d}.png" for i in sorted(q.ids)]
    assert runs["list"].ids.tolist() == [f"images/nested/{i:04d}.png" for i in listed]
    for name, codes in runs.items():
        got = codes.pm1()
        for row, ident in enumerate(codes.ids):
            key = int(ident) if name in ("split", "parquet") else int(Path(ident).stem)
            np.testing.assert_array_equal(got[row], want[key], err_msg=f"{name} {ident}")
        assert (codes.bits, codes.encoder, codes.model_sha256) == (16, "fg", hf.model_sha256)
        assert config.from_dict(tomllib.loads(codes.config_toml)).fingerprint() == \
            hf.cfg.fingerprint()
    learned = encode("learned", "--split", "database", "--learned")
    assert learned.encoder == "B"
    np.testing.assert_array_equal(learned.pm1(), hf.B)
    np.testing.assert_array_equal(learned.ids, ds.database.ids)


def test_encode_script_shows_progress(centred, loaded, tmp_path):
    hf, ds = loaded
    n = len(ds.database)  # 1,597 images in chunks of 8 batches: 13 chunks, a line per tenth
    proc = _cli("encode", "--checkpoint", str(centred), "--split", "database", "--batch", "16",
                "--out", str(tmp_path / "db.parquet"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("encoding")]
    assert 5 <= len(lines) <= 11 and lines[-1].split(": ")[1].startswith(f"{n}/{n} (100%)")
    assert lines[-1].endswith("img/s")


def test_progress_marks_every_tenth_off_a_terminal():
    stream = io.StringIO()
    bar = inference.Progress(200, "encoding x", stream=stream)
    for done in range(0, 201, 7):
        bar.update(done)
    bar.update(200)
    bar.close()
    shown = [int(line.split(": ")[1].split("/")[0]) for line in stream.getvalue().splitlines()]
    assert shown == [21, 42, 63, 84, 105, 126, 140, 161, 182, 200]
    quiet = io.StringIO()
    inference.Progress(10, "x", enabled=False, stream=quiet).update(10)
    assert quiet.getvalue() == ""


def test_codes_file_round_trip_odd_bits_and_string_ids(tmp_path):
    gen = np.random.default_rng(0)
    for bits, ids in ((12, np.array(["a.png", "b/c.jpg", "d"], dtype=object)),
                      (64, np.array([5, 1, 9], np.int64))):
        pm1 = np.where(gen.random((3, bits)) < 0.5, -1, 1).astype(np.int8)
        path = codesfile.write(tmp_path / f"{bits}.parquet", codesfile.Codes.from_pm1(
            ids, pm1, encoder="f", model_sha256="ab" * 32, config_toml="[x]\n"))
        back = codesfile.read(path)
        np.testing.assert_array_equal(back.pm1(), pm1)
        assert back.ids.tolist() == ids.tolist() and back.bits == bits
        assert codesfile.is_codes_file(path)


def test_checkpoint_records_input_geometry(loaded):
    hf, ds = loaded
    assert (hf.channels, hf.image_size) == (ds.channels, ds.image_size) == (1, 8)


# ---------------------------------------------------------------------------------------- search


def test_search_returns_the_brute_force_top_k(loaded, centred, tmp_path, capsys):
    hf, ds = loaded
    db_file, q_file = tmp_path / "db.parquet", tmp_path / "q.parquet"
    common = ["--checkpoint", str(centred), "--quiet"]
    assert cli.encode_main([*common, "--split", "database", "--out", str(db_file)]) == 0
    assert cli.encode_main([*common, "--split", "query", "--encoder", "f",
                            "--out", str(q_file)]) == 0
    capsys.readouterr()
    assert cli.search_main(["--database", str(db_file), "--query", str(q_file), "-k", "25",
                            "--json", "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out)
    order, dist = _brute_force_topk(hf.codes(ds.query.images, "f"),
                                    hf.codes(ds.database.images, "fg"), 25)
    assert [r["query"] for r in got["results"]] == ds.query.ids.tolist()
    assert [r["ids"] for r in got["results"]] == ds.database.ids[order].tolist()
    assert [r["distances"] for r in got["results"]] == dist.tolist()
    assert len({tuple(r["distances"]) for r in got["results"]}) > 10  # not one ranking for all

    # images encoded on the fly give the same table as their codes file
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in zip(ds.query.ids[:5], ds.query.images[:5]):
        Image.fromarray(img[0]).save(folder / f"{i:04d}.png")
    assert cli.search_main(["--database", str(db_file), "--query", str(folder), *common,
                            "--encoder", "f", "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["query", "rank", "id", "distance"] and len(table) == 1 + 5 * 3
    first = table[1].split()
    assert first == [f"{ds.query.ids[0]:04d}.png", "1", str(ds.database.ids[order[0, 0]]),
                     str(dist[0, 0])]


def test_top_k_takes_ties_in_database_order_at_every_k():
    gen = np.random.default_rng(1)
    d = gen.integers(0, 4, 500).astype(np.uint8)  # heavy ties
    full = np.argsort(d, kind="stable")
    for k in (1, 7, 130, 499, 500):
        np.testing.assert_array_equal(codesfile._nearest(d, k), full[:k])


def test_faiss_backend_returns_the_packed_distances(loaded, centred, tmp_path, capsys):
    pytest.importorskip("faiss")
    gen = np.random.default_rng(2)
    hf, ds = loaded
    cases = [np.where(gen.random((n, bits)) < 0.5, -1, 1).astype(np.int8)
             for n, bits in ((3000, 32), (2000, 64))]
    cases.append(np.concatenate([hf.codes(ds.database.images, "fg"), hf.B]))
    for codes in cases:
        packed = retrieval.pack_codes(codes)
        q, db, k = packed[:40], packed[40:], 50
        i_p, d_p = codesfile.topk(q, db, k, codes.shape[1], "packed")
        i_f, d_f = codesfile.topk(q, db, k, codes.shape[1], "faiss")
        np.testing.assert_array_equal(d_p, d_f)
        for row in range(len(q)):
            below = d_p[row] < d_p[row, -1]  # ties at the cut may differ in membership
            assert set(i_p[row][below]) == set(i_f[row][below])
            unique = np.flatnonzero(np.unique(d_p[row], return_counts=True)[1] == 1)
            for value in np.unique(d_p[row])[unique]:
                pos = d_p[row] == value
                assert np.array_equal(i_p[row][pos], i_f[row][pos])  # one id at that distance
    with pytest.raises(codesfile.CodesError, match="multiple of 8"):
        codesfile.topk(packed[:2, :2], packed[:5, :2], 3, 12, "faiss")

    # the command line's --backend faiss gives search's packed table
    db_file, q_file = tmp_path / "db.parquet", tmp_path / "q.parquet"
    common = ["--checkpoint", str(centred), "--quiet"]
    assert cli.encode_main([*common, "--split", "database", "--out", str(db_file)]) == 0
    assert cli.encode_main([*common, "--split", "query", "--out", str(q_file)]) == 0
    tables = {}
    for backend in ("packed", "faiss"):
        capsys.readouterr()
        assert cli.search_main(["--database", str(db_file), "--query", str(q_file), "-k", "20",
                                "--json", "--quiet", "--backend", backend]) == 0
        tables[backend] = json.loads(capsys.readouterr().out)["results"]
    assert [r["distances"] for r in tables["faiss"]] == [r["distances"] for r in tables["packed"]]


# ---------------------------------------------------------------------------------------- export


def test_export_round_trip(loaded, centred, tmp_path):
    hf, ds = loaded
    out = tmp_path / "export"
    proc = _cli("export", "--checkpoint", str(centred), "--encoder", "fg", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    program = export.load_program(out / "hash_fg.pt2")
    images = torch.from_numpy(ds.query.images)
    want = hf.codes(ds.query.images, "fg")
    for batch in (1, 37, len(images)):
        got = torch.cat([program(images[s:s + batch]) for s in range(0, len(images), batch)])
        assert got.dtype == torch.int8
        np.testing.assert_array_equal(got.numpy(), want)
    meta = json.loads((out / "export.json").read_text())
    assert meta["model_sha256"] == hf.model_sha256
    assert meta["input"]["shape"] == ["N", 1, 8, 8] and meta["streams"] == ["f", "g"]
    weights = torch.load(out / "streams.pt", weights_only=True)
    assert inference.model_sha256(*(_stream(hf, weights[n]) for n in ("f", "g"))) == \
        hf.model_sha256


def test_export_whose_program_disagrees_is_one_line_and_keeps_the_last_export(
        centred, tmp_path, monkeypatch, capsys):
    out = tmp_path / "export"
    assert cli.export_main(["--checkpoint", str(centred), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = inference.HashFunction.codes
    monkeypatch.setattr(inference.HashFunction, "codes",
                        lambda self, images, encoder: -real(self, images, encoder))
    capsys.readouterr()
    assert cli.export_main(["--checkpoint", str(centred), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {out / 'hash_fg.pt2'}: ")
    assert "codes differ" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing staged is left


def _stream(hf, state_dict):
    stream = HashStream(hf.bits, hf.channels, hf.image_size, "small_cnn", hf.cfg.model.width,
                        norm=hf.cfg.model.norm)
    stream.load_state_dict(state_dict)
    return stream


# ------------------------------------------------------------------------------------ user errors


def test_device_must_be_one_this_machine_has():
    import argparse

    assert cli.device_arg("cpu") == torch.device("cpu")
    with pytest.raises(argparse.ArgumentTypeError, match="'gpu' is not a torch device"):
        cli.device_arg("gpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(argparse.ArgumentTypeError, match=f"this machine has {n} CUDA"):
        cli.device_arg(f"cuda:{n}")


def _write_codes(path: Path, bits: int, n: int, sha: str) -> Path:
    pm1 = np.where(np.random.default_rng(3).random((n, bits)) < 0.5, -1, 1).astype(np.int8)
    return codesfile.write(path, codesfile.Codes.from_pm1(
        np.arange(n, dtype=np.int64), pm1, encoder="fg", model_sha256=sha))


# Two cases run as real processes (exit code, nothing but one line on stderr); the other two call
# the same entry points in this process, which saves a torch import each.
@pytest.mark.parametrize("case,process", [("model", True), ("corrupt_image", True),
                                          ("bits", False), ("empty", False),
                                          ("out_is_folder", False)])
def test_bad_input_is_one_line_naming_the_file_and_exit_2(case, process, loaded, centred,
                                                          tmp_path, capsys):
    hf, _ = loaded
    db = _write_codes(tmp_path / "db.parquet", 16, 50, hf.model_sha256)
    q = _write_codes(tmp_path / "q.parquet", 16, 4, hf.model_sha256)
    job, args = "search", ["--database", str(db), "--query", str(q)]
    if case == "bits":
        bad = _write_codes(tmp_path / "q8.parquet", 8, 4, hf.model_sha256)
        args[3] = str(bad)
    elif case == "model":
        bad = _write_codes(tmp_path / "other.parquet", 16, 50, "0" * 64)
        args[1] = str(bad)
    elif case == "empty":
        bad = _write_codes(tmp_path / "empty.parquet", 16, 0, hf.model_sha256)
        args[1] = str(bad)
    elif case == "out_is_folder":  # refused before anything is encoded
        bad = tmp_path / "taken"
        bad.mkdir()
        job, args = "encode", ["--checkpoint", str(centred), "--split", "query", "--out",
                               str(bad), "--quiet"]
    else:
        folder = tmp_path / "imgs"
        folder.mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "ok.png")
        bad = folder / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        job, args = "encode", ["--checkpoint", str(centred), "--images", str(folder),
                               "--out", str(tmp_path / "c.parquet"), "--quiet"]
    if process:
        proc = _cli(job, *args)
        code, stderr = proc.returncode, proc.stderr
    else:
        capsys.readouterr()
        code = getattr(cli, f"{job}_main")(args)
        stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert str(bad) in lines[0]
    assert not (tmp_path / "c.parquet").exists()
