"""Using a trained hash function: evaluate, encode, search, export, and their user errors.

One debug run (digits, 16 bits, configs/debug_cpu.toml) is trained once for the module. However
short the debug budget, `centred` re-centres each stream's hash layer on the database features
(bias = -W·mean feature), so that the codes depend on the image and an encoder that mixes up
images cannot pass; `collapsed` is its opposite, a checkpoint whose every code is the same.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from _pty import stderr_on_terminal
from _repo import DEBUG, job, job_args, job_env
from PIL import Image

from dadh_dist import checkpoint as ckpt
from dadh_dist import cli, codesfile, config, encoding, export, inference, report, retrieval
from dadh_dist import run as runner
from dadh_dist.config import ENCODERS
from dadh_dist.data import Split, dataset_to_parquet
from dadh_dist.models import HashStream


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("runs")
    cfg = config.load(DEBUG, ["scaling.use_ray=false", f"log.run_dir={json.dumps(str(tmp))}",
                              "log.name=x"])
    return Path(runner.run_local(cfg)["run_dir"])


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
def collapsed(run, tmp_path_factory) -> Path:
    """A checkpoint of the run whose streams give every image the same code (hash layers
    zeroed but for a fixed bias)."""
    hf = inference.load(run)
    state, manifest = ckpt.load(hf.checkpoint)
    for name in ("f", "g"):
        stream = getattr(hf, name)
        with torch.no_grad():
            stream.head.weight.zero_()
            stream.head.bias.copy_(torch.linspace(-1, 1, hf.bits))
        state[name] = stream.state_dict()
    folder = tmp_path_factory.mktemp("collapsed") / "checkpoint_000002"
    ckpt.save(folder, state, hf.cfg.to_toml(), manifest["fingerprint"])
    return folder


@pytest.fixture(scope="module")
def loaded(centred):
    return inference.load_with_data(centred)


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
    assert result["run_reported"] and result["t"] == final["outer_iters"]
    md = (out / "report.md").read_text()
    assert "agrees with the run's own `final_metrics.json`" in md
    assert "| sign(f+g) |" in md and "](examples.png)" in md
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    scalar = acc.Scalars("eval_query/map_all_fg")[0]
    assert (scalar.step, scalar.value) == (final["outer_iters"],
                                           pytest.approx(final["map_all_fg"]))
    images = set(acc.Tags()["images"])
    assert {"eval_query/pr_curve", "eval_query/precision_at_n", "eval_query/examples"} <= images
    assert all(" " not in tag and "–" not in tag for tag in images | set(acc.Tags()["scalars"]))


def test_evaluate_script_reports_map_at_1000_by_default(run, collapsed, tmp_path):
    out = tmp_path / "eval"
    proc = job("evaluate", "--checkpoint", str(run), "--out", str(out), "--examples", "0",
                "--no-tensorboard")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    hf, ds = inference.load_with_data(run)
    outputs = hf.outputs(ds.query.images, list(ENCODERS))
    for e in ENCODERS:  # the debug config leaves eval.topk at 0: mAP@1000 of 1,597 images
        q = encoding.query_codes(outputs, e)
        want = retrieval.mean_average_precision(q, hf.B, ds.query.labels, ds.database.labels,
                                                topk=1000)
        assert m[f"map_at_1000_{e}"] == pytest.approx(want, abs=1e-9)
    # a cut-off, not mAP@all renamed: a well-trained stream may rank all of its class first,
    # where the two agree; on the collapsed checkpoint, whose ties span the database, they differ
    hf_c, _ = inference.load_with_data(collapsed)
    ev = report.evaluate(hf_c, ds, ["fg"])
    want = retrieval.mean_average_precision(ev.query_codes["fg"], hf_c.B, ds.query.labels,
                                            ds.database.labels, topk=1000)
    assert ev.metrics["map_at_1000_fg"] == pytest.approx(want, abs=1e-9)
    assert ev.metrics["map_at_1000_fg"] != pytest.approx(ev.metrics["map_all_fg"], abs=1e-6)
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
        argv = ["--checkpoint", str(centred), "--out", str(out), "--quiet", "--batch-size", "16"]
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


def test_encode_shows_a_progress_bar_on_a_terminal_only(centred, loaded, tmp_path, capsys):
    hf, ds = loaded
    n = len(ds.database)
    proc, shown = stderr_on_terminal(
        job_args("encode", "--checkpoint", centred, "--split", "database", "--batch-size", "16",
                 "--out", tmp_path / "db.parquet"),
        timeout=120, env=job_env())
    assert proc.returncode == 0, shown
    assert f"{n}/{n}" in shown and "img/s" in shown and "<00:00" in shown  # count, rate, ETA
    assert "\r" in shown  # rewritten in place

    # stderr not a terminal (here: pytest's capture), or --quiet: no bar at all
    for extra in ([], ["--quiet"]):
        capsys.readouterr()
        assert cli.encode_main(["--checkpoint", str(centred), "--split", "query", "--out",
                                str(tmp_path / "q.parquet"), *extra]) == 0
        captured = capsys.readouterr()
        assert "encoding" not in captured.err and "img/s" not in captured.err
        assert captured.out.startswith(f"wrote {len(ds.query)} codes")
        assert ("images read and encoded in" in captured.out) == (extra == [])


def test_progress_bar_has_rate_and_eta_and_is_off_without_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, enabled, drawn in ((Terminal(), True, True), (io.StringIO(), True, False),
                                   (Terminal(), False, False)):
        with inference.progress_bar(200, "encoding x", enabled, stream) as bar:
            for _ in range(4):
                bar.update(50)
        text = stream.getvalue()
        assert bool(text) == drawn, (type(stream).__name__, enabled)
        if drawn:
            assert "encoding x" in text and "200/200" in text and "img/s" in text


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
    proc = job("export", "--checkpoint", str(centred), "--encoder", "fg", "--out", str(out))
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
    tool, args = "search", ["--database", str(db), "--query", str(q)]
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
        tool, args = "encode", ["--checkpoint", str(centred), "--split", "query", "--out",
                               str(bad), "--quiet"]
    else:
        folder = tmp_path / "imgs"
        folder.mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "ok.png")
        bad = folder / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        tool, args = "encode", ["--checkpoint", str(centred), "--images", str(folder),
                               "--out", str(tmp_path / "c.parquet"), "--quiet"]
    if process:
        proc = job(tool, *args)
        code, stderr = proc.returncode, proc.stderr
    else:
        capsys.readouterr()
        code = getattr(cli, f"{tool}_main")(args)
        stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert str(bad) in lines[0]
    assert not (tmp_path / "c.parquet").exists()


# --------------------------------------------------------------------------- honest messages


def test_encode_lists_every_unreadable_image_and_notes_what_it_skips_or_adapts(
        centred, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    gen = np.random.default_rng(4)
    Image.fromarray(gen.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(gen.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(gen.integers(0, 255, (16, 12, 3), dtype=np.uint8)).save(folder / "c.png")
    (folder / "notes.txt").write_text("not an image")
    bad = [folder / "d_broken.png", folder / "e_empty.jpg"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad[1].write_bytes(b"")
    out = tmp_path / "c.parquet"
    argv = ["--checkpoint", str(centred), "--images", str(folder), "--out", str(out), "--quiet"]

    assert cli.encode_main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert [line.split(": ")[1] for line in errors[:-1]] == [str(b) for b in bad]
    assert errors[-1] == ("error: 2 of 5 images could not be read (listed above); nothing was "
                          "written")
    assert any(line.startswith("note: skipped 1 file(s)") and "notes.txt" in line for line in err)
    assert not out.exists() and "Traceback" not in "\n".join(err)

    # the same as JSON: one object on stdout naming both files, exit 2
    assert cli.encode_main([*argv, "--json"]) == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["exit_code"] == 2 and payload["error"].startswith("2 of 5 images")
    assert [p.split(": ")[0] for p in payload["problems"]] == [str(b) for b in bad]

    for b in bad:
        b.unlink()
    assert cli.encode_main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["codes"] == result["images_read"] == 3 and result["out"] == str(out)
    assert result["notes"][1:] == [
        "converted 1 image(s) (RGB: 1) to grayscale (the model takes 1 channel)",
        "resized 1 image(s) to 8x8 px (bilinear; from 12x16: 1)"]
    assert codesfile.read(out).ids.tolist() == ["a.png", "b.png", "c.png"]


def test_encode_learned_says_it_read_no_image(centred, tmp_path, capsys):
    assert cli.encode_main(["--checkpoint", str(centred), "--split", "database", "--learned",
                            "--out", str(tmp_path / "db.parquet")]) == 0
    line = capsys.readouterr().out.strip()
    assert "the run's learned codes B, no image read" in line and "reading" not in line


def test_deprecated_spellings_still_work_with_a_note(centred, loaded, tmp_path, capsys):
    hf, ds = loaded
    db = tmp_path / "db.parquet"
    assert cli.encode_main(["--checkpoint", str(centred), "--split", "database", "--out",
                            str(db), "--batch", "50", "--quiet"]) == 0
    assert "note: --batch is deprecated, use --batch-size" in capsys.readouterr().err
    np.testing.assert_array_equal(codesfile.read(db).pm1(), hf.codes(ds.database.images, "fg"))
    assert cli.search_main(["--database", str(db), "--query", str(db), "--k", "3", "--json",
                            "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "note: --k is deprecated, use --topk/-k" in captured.err
    assert json.loads(captured.out)["k"] == 3


def test_search_names_an_empty_or_corrupt_query_file_for_what_it_is(tmp_path, capsys):
    db = _write_codes(tmp_path / "db.parquet", 16, 50, "ab" * 32)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(db.read_bytes()[:-20])
    other = tmp_path / "table.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), other)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    cases = {empty: "empty file (0 bytes)", truncated: "corrupt Parquet file",
             other: "neither codes-file metadata nor an image column (columns: x)"}
    for query, says in cases.items():
        assert cli.search_main(["--database", str(db), "--query", str(query)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {query}: ") and says in err, err
        assert "holds images" not in err and "\n" not in err
    assert cli.search_main(["--database", str(empty), "--query", str(db)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {empty}: empty file (0 bytes), not a "
                                               "codes file")


def test_search_notes_a_k_above_the_database_size(tmp_path, capsys):
    db = _write_codes(tmp_path / "db.parquet", 16, 50, "ab" * 32)
    q = _write_codes(tmp_path / "q.parquet", 16, 4, "ab" * 32)
    assert cli.search_main(["--database", str(db), "--query", str(q), "-k", "500", "--json"]) == 0
    captured = capsys.readouterr()
    note = f"note: -k 500 is more than the 50 codes in {db}: each query gets all 50"
    assert note in captured.err.splitlines()
    payload = json.loads(captured.out)
    assert (payload["k"], payload["k_requested"]) == (50, 500)
    assert payload["notes"] == [note.removeprefix("note: ")]
    assert all(len(r["ids"]) == 50 for r in payload["results"])
    assert cli.search_main(["--database", str(db), "--query", str(q), "-k", "50"]) == 0
    assert "note:" not in capsys.readouterr().err  # exactly the database size: nothing to say


def test_search_writes_its_results_to_out(tmp_path, capsys):
    db = _write_codes(tmp_path / "db.parquet", 16, 20, "ab" * 32)
    out = tmp_path / "results.json"
    assert cli.search_main(["--database", str(db), "--query", str(db), "-k", "2", "--json",
                            "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    results = json.loads(out.read_text())["results"]
    assert [r["ids"][0] for r in results] == list(range(20))  # each code finds itself first


def test_evaluate_warns_when_codes_collapse_and_not_otherwise(run, collapsed, tmp_path, capsys):
    common = ["--examples", "0", "--no-tensorboard", "--json"]
    assert cli.evaluate_main(["--checkpoint", str(collapsed), "--out", str(tmp_path / "bad"),
                              *common]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result["warnings"]) == set(ENCODERS)
    for e in ENCODERS:
        assert result["warnings"][e].startswith("codes collapsed: 1 distinct query code(s)")
        assert f"warning: {report.NAMES[e]}: codes collapsed" in captured.err
    saved = json.loads((tmp_path / "bad" / "metrics.json").read_text())
    assert saved["warnings"] == result["warnings"]
    assert saved["health"]["distinct_query_codes"] == {e: 1 for e in ENCODERS}
    md = (tmp_path / "bad" / "report.md").read_text()
    assert "> **Warning** (sign(f+g)): codes collapsed" in md

    # the trained run: no warning, and a --topk above the database size is noted
    assert cli.evaluate_main(["--checkpoint", str(run), "--out", str(tmp_path / "good"),
                              "--topk", "5000", *common]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["warnings"] == {} and "warning" not in captured.err
    assert result["notes"] == ["--topk 5000 is more than the 1597 database codes: mAP@5000 is "
                               "mAP@all"]
    m = result["metrics"]
    assert m["map_at_5000_fg"] == pytest.approx(m["map_all_fg"], abs=1e-12)
    health = json.loads((tmp_path / "good" / "metrics.json").read_text())["health"]
    assert health["chance_map"] == pytest.approx(0.1, abs=0.02)  # digits: ten balanced classes
    assert min(health["distinct_query_codes"].values()) > 10


def test_json_errors_of_model_tools_are_json_on_stdout(tmp_path, capsys):
    missing = tmp_path / "no_run"
    for main in (cli.evaluate_main, cli.export_main):
        assert main(["--checkpoint", str(missing), "--json"]) == cli.EXIT_USER_ERROR
        captured = capsys.readouterr()
        assert captured.err == ""
        assert json.loads(captured.out) == {
            "error": f"{missing}: no such run or checkpoint folder", "exit_code": 2}
    assert cli.encode_main(["--checkpoint", str(missing), "--split", "query", "--out",
                            str(tmp_path / "x.parquet"), "--device", "gpu", "--json"]) == 2
    payload = json.loads(capsys.readouterr().out)
    assert payload["error"].startswith("--device: 'gpu' is not a torch device")


# ------------------------------------------------------------------ sources that look like others


def _png_file(path: Path, pixels: np.ndarray, **save) -> Path:
    Image.fromarray(pixels).save(path, **save)
    return path


def test_a_codes_file_is_not_taken_for_images_or_image_shards(centred, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    gen = np.random.default_rng(5)
    for name in ("a.png", "b.png"):
        _png_file(folder / name, gen.integers(0, 256, (8, 8), dtype=np.uint8))
    common = ["--checkpoint", str(centred), "--quiet"]
    codes = folder / "codes.parquet"  # encode's output written into the image folder
    assert cli.encode_main([*common, "--images", str(folder), "--out", str(codes)]) == 0
    capsys.readouterr()

    # encoding the folder again: its images, the codes file skipped with one note
    again = tmp_path / "again.parquet"
    assert cli.encode_main([*common, "--images", str(folder), "--out", str(again)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: skipped 1 codes file(s) in {folder} (jobs/encode.py output, not "
                   "images or image shards): codes.parquet"]
    back = codesfile.read(again)
    assert back.ids.tolist() == ["a.png", "b.png"]
    np.testing.assert_array_equal(back.packed, codesfile.read(codes).packed)

    # the codes file itself as --images: one line saying what it is, not pyarrow's schema
    assert cli.encode_main([*common, "--images", str(codes), "--out", str(tmp_path / "x.pq")]) \
        == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {codes}: is a codes file (columns id, code), not images; encode the images it "
        "was made from"]


def test_parquet_image_shards_with_other_ids_or_columns_are_one_line_errors(centred, tmp_path,
                                                                             capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, "PNG")
    image = pa.array([png.getvalue()] * 2, pa.binary())
    cases = {  # shard columns -> what the one line says
        "names": ({"image": image, "id": pa.array(["b.png", "c.png"])},
                  "column id must be int64, got string"),
        "huge": ({"image": image, "id": pa.array([1, 2**63 + 1], pa.uint64())},
                 f"column id holds {2**63 + 1}, beyond int64"),
        "no_image": ({"pixels": image, "id": pa.array([1, 2])},
                     "has no column 'image' (columns: pixels, id)"),
    }
    for name, (columns, says) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        shard = folder / "part-00000.parquet"
        pq.write_table(pa.table(columns), shard)
        assert cli.encode_main(["--checkpoint", str(centred), "--images", str(folder), "--out",
                                str(tmp_path / f"{name}_codes.parquet"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {shard}: ") and says in err and "\n" not in err, err
        assert not (tmp_path / f"{name}_codes.parquet").exists()


def test_16_bit_gray_images_encode_as_the_same_image_at_8_bits(centred, loaded, tmp_path,
                                                              capsys):
    hf, ds = loaded
    x = ds.query.images[:4, 0]  # (4, 8, 8) uint8
    folder = tmp_path / "deep"
    folder.mkdir()
    for i, img in enumerate(x):
        _png_file(folder / f"{i}_8.png", img)
        _png_file(folder / f"{i}_16.png", img.astype(np.uint16) * 257)  # opens as I;16
    _png_file(folder / "0_32.tif", x[0].astype(np.int32) * 257)  # opens as I (32-bit)
    assert Image.open(folder / "0_16.png").mode == "I;16"
    assert Image.open(folder / "0_32.tif").mode == "I"
    out = tmp_path / "deep.parquet"
    assert cli.encode_main(["--checkpoint", str(centred), "--images", str(folder), "--out",
                            str(out), "--quiet", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert notes == ["converted 5 image(s) (I;16: 4, I: 1) to grayscale (the model takes 1 "
                     "channel)"]
    codes = codesfile.read(out)
    got = dict(zip(codes.ids.tolist(), codes.pm1()))
    want = hf.codes(x[:, None], "fg")
    for i in range(4):
        np.testing.assert_array_equal(got[f"{i}_16.png"], want[i])
        np.testing.assert_array_equal(got[f"{i}_8.png"], want[i])
    np.testing.assert_array_equal(got["0_32.tif"], want[0])
    # not all white: value / 257, rounded (128 above a multiple of 257 rounds down, 129 up)
    deep = io.BytesIO()
    Image.fromarray(np.array([[0, 257 * 3 + 128, 257 * 3 + 129, 65535]], np.uint16)).save(
        deep, "PNG")
    assert inference.decode(deep.getvalue(), 1, 4, "x")[0, 0].tolist() == [0, 3, 4, 255]


def test_float_images_encode_as_training_decodes_them():
    """Encode, search and serve decode a float image (mode F) by its range, as training does:
    0..1 times 255 (convert("L") made it black), 0..255 as it is, another range refused."""
    from dadh_dist.data import DataError
    from dadh_dist.data.images import decode as training_decode

    eight = np.random.default_rng(5).integers(0, 256, (4, 4), dtype=np.uint8)
    for pixels in (eight / np.float32(255), eight.astype(np.float32)):
        blob = io.BytesIO()
        Image.fromarray(pixels.astype(np.float32)).save(blob, "TIFF")
        got, mode, _ = inference.decode_noting(blob.getvalue(), 1, 4, "x.tif")
        np.testing.assert_array_equal(got[0], eight)
        assert mode == "F"  # noted as converted
        np.testing.assert_array_equal(inference.decode(blob.getvalue(), 3, 4, "x.tif"),
                                      training_decode(blob.getvalue(), rgb=True))
    blob = io.BytesIO()
    Image.fromarray(np.array([[0.0, 1000.0]], np.float32)).save(blob, "TIFF")
    with pytest.raises(DataError, match=r"^x.tif: unreadable image \(float pixels in 0..1000: "
                       r"only 0..1 and 0..255 are read"):
        inference.decode(blob.getvalue(), 1, 2, "x.tif")


def test_gray_gifs_and_gray_palettes_encode_as_gray_images(centred, loaded, tmp_path, capsys):
    hf, ds = loaded
    x = ds.query.images[0, 0]
    folder = tmp_path / "gray"
    folder.mkdir()
    _png_file(folder / "a.gif", x)  # a GIF stores a palette (mode P), here of grays
    Image.fromarray(x).convert("P").save(folder / "b.png")  # a palette PNG of grays
    Image.fromarray(x).convert("RGB").save(folder / "c.png")  # gray pixels stored as RGB
    colour = np.stack([x, x // 2, 255 - x], -1)
    Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "d.png")
    assert [Image.open(folder / n).mode for n in ("a.gif", "b.png", "c.png", "d.png")] == \
        ["P", "P", "RGB", "P"]
    out = tmp_path / "gray.parquet"
    assert cli.encode_main(["--checkpoint", str(centred), "--images", str(folder), "--out",
                            str(out), "--quiet", "--json"]) == 0
    # only the colour palette is converted with a loss: the rest already is gray
    assert json.loads(capsys.readouterr().out)["notes"] == [
        "converted 1 image(s) (P: 1) to grayscale (the model takes 1 channel)"]
    codes = codesfile.read(out).pm1()
    want = hf.codes(x[None, None], "fg")[0]
    for row in codes[:3]:
        np.testing.assert_array_equal(row, want)


# ------------------------------------------------------------------------ outputs, checked first


def test_evaluate_and_export_refuse_an_out_they_cannot_write_before_the_work(
        run, tmp_path, monkeypatch, capsys):
    taken = tmp_path / "report.md"
    taken.write_text("an earlier report")

    def no_work(*args, **kwargs):
        raise AssertionError("the output was checked after the work")

    monkeypatch.setattr(report, "evaluate", no_work)
    monkeypatch.setattr(export, "export", no_work)
    cases = [(taken, "is a file; --out names the"), (taken / "sub", f"cannot create {taken}")]
    for main in (cli.evaluate_main, cli.export_main):
        for out, says in cases:
            assert main(["--checkpoint", str(run), "--out", str(out)]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: --out {out}: ") and says in err, err
            assert "\n" not in err and "Traceback" not in err
    assert taken.read_text() == "an earlier report"  # nothing already written is lost

    # an OSError while writing (here: a full disk) is one line too, exit 2
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "ev" / "report.md"))

    monkeypatch.setattr(report, "evaluate", lambda *a, **k: None)
    monkeypatch.setattr(report, "write", full)
    assert cli.evaluate_main(["--checkpoint", str(run), "--out", str(tmp_path / "ev")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {tmp_path / 'ev'}: cannot write {tmp_path / 'ev' / 'report.md'} (No "
        "space left on device)")


def test_a_tool_that_fails_removes_the_folders_it_made_not_those_that_were_there(
        centred, tmp_path, monkeypatch, capsys):
    """check_out makes a missing --out folder (a file's parent for encode); a tool that then
    fails (exit 1, 2 or 130) removes what it made, parents included, and nothing else."""
    real = inference.HashFunction.codes
    with monkeypatch.context() as m:  # the program disagrees: export fails after check_out
        m.setattr(inference.HashFunction, "codes",
                  lambda self, images, encoder: -real(self, images, encoder))
        assert cli.export_main(["--checkpoint", str(centred), "--out",
                                str(tmp_path / "new" / "export")]) == 1
    assert "codes differ" in capsys.readouterr().err
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "bad.png").write_bytes(b"not a png")
    empty = tmp_path / "empty"  # there before: stays, as it was
    empty.mkdir()
    for out in (tmp_path / "made" / "deeper" / "codes.parquet", empty / "codes.parquet"):
        assert cli.encode_main(["--checkpoint", str(centred), "--images", str(photos), "--out",
                                str(out)]) == 2
        assert "bad.png" in capsys.readouterr().err
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("mine")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "evaluate", interrupted)
    for out in (tmp_path / "ev", kept):
        assert cli.evaluate_main(["--checkpoint", str(centred), "--out", str(out)]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "kept", "photos"]
    assert list(empty.iterdir()) == [] and _files(kept) == {"mine.txt": b"mine"}
    monkeypatch.undo()  # and a tool that succeeds keeps the folder it made
    out = tmp_path / "made" / "codes.parquet"
    assert cli.encode_main(["--checkpoint", str(centred), "--split", "query", "--out", str(out),
                            "--quiet"]) == 0
    assert out.is_file()


def test_search_refuses_an_out_it_cannot_write_before_encoding(centred, tmp_path, monkeypatch,
                                                               capsys):
    db = _write_codes(tmp_path / "db.parquet", 16, 20, "ab" * 32)
    taken = tmp_path / "file"
    taken.write_text("x")
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png_file(folder / "a.png", np.zeros((8, 8), np.uint8))

    def no_work(*args, **kwargs):
        raise AssertionError("--out was checked after the encoding")

    monkeypatch.setattr(inference, "load", no_work)
    out = taken / "results.txt"
    assert cli.search_main(["--database", str(db), "--query", str(folder), "--checkpoint",
                            str(centred), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out}: cannot create {taken}") and "\n" not in err
    # a missing folder is made, as encode makes it
    new = tmp_path / "new" / "results.json"
    assert cli.search_main(["--database", str(db), "--query", str(db), "-k", "1", "--json",
                            "--out", str(new), "--quiet"]) == 0
    assert len(json.loads(new.read_text())["results"]) == 20


def test_tools_record_the_checkpoint_absolute_whatever_the_working_directory(
        centred, tmp_path, monkeypatch):
    monkeypatch.chdir(centred.parent.parent)
    relative = f"{centred.parent.name}/{centred.name}"
    out = tmp_path / "codes.parquet"
    assert cli.encode_main(["--checkpoint", relative, "--split", "query", "--out", str(out),
                            "--quiet"]) == 0
    assert codesfile.read(out).checkpoint == str(centred.resolve())
    hf = inference.load(relative)
    export.export(hf, "f", tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "export.json").read_text())
    assert meta["checkpoint"] == str(centred.resolve())


# --------------------------------------------------------------------------------- codes' ids


def test_ids_beyond_int64_are_refused_not_wrapped(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pm1 = np.ones((2, 16), np.int8)
    huge = np.array([1, 2**63 + 5], np.uint64)
    with pytest.raises(codesfile.CodesError, match=f"column 'id' holds id {2**63 + 5}, beyond"):
        codesfile.write(tmp_path / "w.parquet", codesfile.Codes.from_pm1(
            huge, pm1, encoder="f", model_sha256="ab" * 32))
    assert not (tmp_path / "w.parquet").exists()
    small = codesfile.write(tmp_path / "small.parquet", codesfile.Codes.from_pm1(
        np.array([1, 2**63 - 1], np.uint64), pm1, encoder="f", model_sha256="ab" * 32))
    assert codesfile.read(small).ids.tolist() == [1, 2**63 - 1]  # unsigned that fit: accepted

    # a file of uint64 ids (written by something else) with one beyond int64
    table = pq.read_table(small)
    table = table.set_column(0, "id", pa.array(huge, pa.uint64()))
    bad = tmp_path / "bad.parquet"
    pq.write_table(table, bad)
    with pytest.raises(codesfile.CodesError, match="beyond int64"):
        codesfile.read(bad)
    assert cli.search_main(["--database", str(bad), "--query", str(small)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {bad}: column 'id' holds id {2**63 + 5}, beyond int64 (ids must fit int64)")


# ------------------------------------------------------------------ where default outputs go


def test_export_and_evaluate_of_a_run_uri_publish_next_to_the_run_an_out_stays_local(
        run, tmp_path, monkeypatch, capsys):
    remote = tmp_path / "remote" / run.name
    shutil.copytree(run, remote, ignore=shutil.ignore_patterns("tb"))
    monkeypatch.setenv("DADH_MIRROR_DIR", str(tmp_path / "mirrors"))
    newest = ckpt.latest_valid(remote).name
    uri = f"file://{remote}"
    assert cli.export_main(["--checkpoint", uri, "--encoder", "f", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["published"] == f"{uri}/export/{newest}_f"
    sent = remote / "export" / f"{newest}_f"
    assert sorted(p.name for p in sent.iterdir()) == ["export.json", "hash_f.pt2", "streams.pt"]
    assert (sent / "hash_f.pt2").read_bytes() == Path(result["program"]).read_bytes()
    # one checkpoint of the run: its run is the parent URI; an explicit --out stays local
    out = tmp_path / "mine"
    assert cli.export_main(["--checkpoint", f"{uri}/{newest}", "--encoder", "f", "--out",
                            str(out), "--json"]) == 0
    assert "published" not in json.loads(capsys.readouterr().out)
    assert list((remote / "export").iterdir()) == [sent] and (out / "hash_f.pt2").is_file()
    assert inference.load(f"{uri}/{newest}").run_uri == uri
    # evaluate of a checkpoint URI publishes its report next to the run the same way
    assert cli.evaluate_main(["--checkpoint", f"{uri}/{newest}", "--examples", "0",
                              "--no-tensorboard", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["published"] == f"{uri}/eval/{newest}_query"
    assert (remote / "eval" / f"{newest}_query" / "report.md").is_file()
    # evaluated again, with TensorBoard and no picture: one events file, no stale picture,
    # here and there
    sent = remote / "eval" / f"{newest}_query"
    (sent / "examples.png").write_bytes(b"old")
    for examples in ("1", "0"):
        assert cli.evaluate_main(["--checkpoint", f"{uri}/{newest}", "--examples", examples,
                                  "--json"]) == 0
    here = Path(json.loads(capsys.readouterr().out.splitlines()[-1])["out"])
    for folder in (here, sent):
        assert not (folder / "examples.png").exists(), folder
        assert len(list((folder / "tb").iterdir())) == 1, folder
        assert (folder / "report.md").read_text() == (here / "report.md").read_text()


def test_a_checkpoint_named_dot_or_dot_dot_gives_its_real_names(run, monkeypatch):
    newest = ckpt.latest_valid(run)
    monkeypatch.chdir(newest)
    for given in (".", "./", "..", f"../{newest.name}/"):
        hf = inference.load(given)
        assert (hf.checkpoint, hf.run_folder) == (newest, run), given


def test_an_export_over_another_encoders_export_leaves_only_its_own_files(centred, tmp_path):
    hf = inference.load(centred)
    out = tmp_path / "export"
    out.mkdir()
    for name in ("notes.txt", "hash_f.pt2", "hash_fg.pt2"):  # earlier exports', and the user's
        (out / name).write_text("earlier")
    notes = os.stat(out / "notes.txt")
    export.export(hf, "g", out)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "hash_g.pt2", "notes.txt",
                                                     "streams.pt"]
    assert json.loads((out / "export.json").read_text())["encoder"] == "g"
    # the user's file is left as it was, and no staging folder is left
    assert os.path.samestat(os.stat(out / "notes.txt"), notes)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def _stop_at(k: int, calls: list):
    """A wrapper of a call that raises KeyboardInterrupt instead of making the k-th call
    counted in `calls` (shared by every call wrapped)."""
    def wrap(real):
        def call(*args, **kwargs):
            calls.append(real)
            if len(calls) == k:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        return call

    return wrap


def _one_export(files: dict, exports: tuple[dict, ...]) -> bool:
    """Whether `files` (the user's aside) are some of one export's, export.json only with all."""
    return (any(files.items() <= one.items() for one in exports)
            and ("export.json" not in files or files in exports))


def test_an_export_stopped_between_its_writes_is_never_mixed_with_the_earlier(
        centred, tmp_path, monkeypatch, capsys):
    """Ctrl-C at each rename as the files are put in place: the folder holds some of the new
    export's files, export.json only with all of them, and the user's file; never a file of the
    earlier export beside one of the new (the three files were renamed in one by one over the
    earlier ones, and a stop between two left a new program beside the earlier weights and
    export.json)."""
    earlier = tmp_path / "earlier"
    assert cli.export_main(["--checkpoint", str(centred), "--encoder", "fg", "--out",
                            str(earlier), "--quiet"]) == 0
    before = _files(earlier)
    (earlier / "notes.txt").write_text("mine")
    done = tmp_path / "done"
    assert cli.export_main(["--checkpoint", str(centred), "--encoder", "g", "--out",
                            str(done), "--quiet"]) == 0
    new = _files(done)
    for k in (1, 2, 3):
        out = tmp_path / f"out{k}"
        shutil.copytree(earlier, out)
        wrap = _stop_at(k, [])
        with monkeypatch.context() as m:
            m.setattr(os, "replace", wrap(os.replace))
            assert cli.export_main(["--checkpoint", str(centred), "--encoder", "g", "--out",
                                    str(out), "--quiet"]) == 130
        files = _files(out)
        assert files.pop("notes.txt") == b"mine", k
        assert "export.json" not in files and _one_export(files, (before, new)), (k, files)
        assert not any(p.name.startswith(".export-") for p in out.iterdir())  # nothing staged
    capsys.readouterr()


def test_an_export_install_stopped_at_any_step_is_never_mixed_with_the_earlier(tmp_path,
                                                                               monkeypatch):
    """Every step of putting a staged export in place (each unlink and rename), stopped in
    turn: `out` holds files of one export only, export.json only with all of them, and the
    user's file; the install run to its end leaves the new export and nothing staged."""
    earlier = {"hash_fg.pt2": b"old program", "streams.pt": b"old weights",
               "export.json": b"old fg"}
    new = {"hash_g.pt2": b"new program", "streams.pt": b"new weights", "export.json": b"new g"}
    for k in range(1, 60):
        out = tmp_path / str(k)
        out.mkdir()
        for name, data in {**earlier, "notes.txt": b"mine"}.items():
            (out / name).write_bytes(data)
        wrap = _stop_at(k, [])
        finished = False
        with monkeypatch.context() as m:
            m.setattr(os, "replace", wrap(os.replace))
            m.setattr(Path, "unlink", wrap(Path.unlink))
            try:
                with export.staging_for(out) as staging:
                    for name, data in new.items():
                        (staging / name).write_bytes(data)
                    export.install(staging, out, list(new))
                finished = True
            except KeyboardInterrupt:
                pass
        files = _files(out)
        assert files.pop("notes.txt") == b"mine", k
        assert _one_export(files, (earlier, new)), (k, files)
        if finished:
            assert files == new and sorted(os.listdir(out)) == sorted([*new, "notes.txt"])
            break
    else:
        pytest.fail("the install never finished")


def test_evaluate_reports_an_encoder_named_twice_once(centred, tmp_path, capsys):
    assert cli.evaluate_main(["--checkpoint", str(centred), "--encoders", "fg,f,fg",
                              "--out", str(tmp_path / "ev"), "--examples", "0",
                              "--no-tensorboard", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(k for k in result["metrics"] if k.startswith("map_all_")) == [
        "map_all_f", "map_all_fg"]
    assert (tmp_path / "ev" / "report.md").read_text().count(f"| {report.NAMES['fg']} ") == 1


def test_a_run_whose_data_moved_is_read_from_data_root(run, tmp_path, capsys):
    hf, ds = inference.load_with_data(run)
    state, manifest = ckpt.load(hf.checkpoint)
    dataset_to_parquet(ds, tmp_path / "before")
    cfg = hf.cfg.with_overrides({"data.source": "parquet", "data.root": str(tmp_path / "before")})
    moved = tmp_path / "runs" / "checkpoint_000002"
    ckpt.save(moved, state, cfg.to_toml(), manifest["fingerprint"])
    (tmp_path / "before").rename(tmp_path / "after")
    fast = ["--examples", "0", "--no-tensorboard", "--json"]

    assert cli.evaluate_main(["--checkpoint", str(moved), "--out", str(tmp_path / "e0"),
                              *fast]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert "data.root" in error and "before" in error and "--data-root" in error
    assert not (tmp_path / "e0").exists()

    assert cli.evaluate_main(["--checkpoint", str(moved), "--out", str(tmp_path / "e1"),
                              "--data-root", str(tmp_path / "after"), *fast]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    final = json.loads((run / "final_metrics.json").read_text())
    assert metrics["map_all_fg"] == pytest.approx(final["map_all_fg"], abs=1e-9)

    out = tmp_path / "b.parquet"
    assert cli.encode_main(["--checkpoint", str(moved), "--split", "database", "--learned",
                            "--data-root", str(tmp_path / "after"), "--out", str(out),
                            "--quiet"]) == 0
    assert np.array_equal(codesfile.read(out).pm1(), hf.B)
    capsys.readouterr()
    # --data-root where it reads nothing: refused, never ignored
    for main, argv in ((cli.encode_main, ["--images", str(out), "--out", str(tmp_path / "c")]),
                       (cli.search_main, ["--database", str(out), "--query", str(out)]),
                       (cli.evaluate_main, ["--out", str(tmp_path / "e2")])):
        checkpoint = run if main is cli.evaluate_main else moved
        assert main(["--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "after"),
                     *argv, "--json"]) == 2
        error = json.loads(capsys.readouterr().out)["error"]
        assert error.startswith("--data-root: "), error


def test_exported_program_counts_a_zero_as_minus_one_like_encoding_at_every_batch_size(tmp_path):
    """sign(0) = -1 in encoding.query_codes and in the exported program alike: f's first unit
    is 0 and g = -f exactly, so f + g is 0 everywhere. An odd GroupNorm width, colour images
    and an input_size other than the images' side (resized inside the program) on the way."""
    bits, side = 6, 12
    cfg = config.Config().with_overrides({"objective.bits": bits, "model.width": 3,
                                          "model.input_size": 8, "model.norm": "group"})
    f = HashStream(bits, 3, side, width=3, input_size=8, norm="group")
    with torch.no_grad():
        f.head.weight[0].zero_()
        f.head.bias[0] = 0.0
    g = HashStream(bits, 3, side, width=3, input_size=8, norm="group")
    g.load_state_dict(f.state_dict())
    with torch.no_grad():
        g.head.weight.neg_()
        g.head.bias.neg_()
    hf = inference.HashFunction(cfg=cfg, f=f.eval(), g=g.eval(), B=np.ones((2, bits), np.int8),
                                t=0, checkpoint=tmp_path, channels=3, image_size=side,
                                device=torch.device("cpu"),
                                model_sha256=inference.model_sha256(f, g))
    x = export.example_images(hf, 37, seed=5)
    outputs = hf.outputs(x, ["fg"])
    assert (outputs["f"][:, 0] == 0).all() and (outputs["f"] + outputs["g"] == 0).all()
    codes_f = hf.codes(x, "f")
    assert (codes_f[:, 0] == -1).all() and (codes_f[:, 1:] == 1).any()
    want = hf.codes(x, "fg")
    assert (want == -1).all()
    program = export.load_program(export.export(hf, "fg", tmp_path / "fg")["program"])
    for n in (1, 2, 37):
        got = program(x[:n])
        assert got.dtype == torch.int8 and got.shape == (n, bits)
        np.testing.assert_array_equal(got.numpy(), want[:n])


def test_the_round_trip_check_takes_its_reference_on_the_cpu_where_the_program_runs(
        loaded, tmp_path):
    """A hash function on a GPU had its reference codes computed there (other rounding: a good
    program could fail near 0). Here the device is named but unused: the check must not touch
    it."""
    hf, _ = loaded
    program = export.export(hf, "fg", tmp_path / "fg")["program"]
    elsewhere = dataclasses.replace(hf, device=torch.device("cuda"))
    export.check_round_trip(elsewhere, "fg", program)
    assert export.on_cpu(hf) is hf and export.on_cpu(elsewhere).f is not hf.f


def test_evaluate_notes_a_precision_at_beyond_the_database(run, tmp_path, capsys):
    hf = inference.load(run)
    state, manifest = ckpt.load(hf.checkpoint)
    cfg = hf.cfg.with_overrides({"eval.precision_at": 5000})
    folder = tmp_path / "checkpoint_000002"
    ckpt.save(folder, state, cfg.to_toml(), manifest["fingerprint"])
    assert cli.evaluate_main(["--checkpoint", str(folder), "--out", str(tmp_path / "e"),
                              "--examples", "0", "--no-tensorboard", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert ("eval.precision_at = 5000 is more than the 1597 database codes: P@5000 is the "
            "precision over all 1597") in result["notes"]
    assert result["metrics"]["p_at_5000_fg"] == pytest.approx(0.1, abs=0.01)


# ------------------------------------------------------- outputs that would destroy something


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_no_tool_writes_over_a_run_its_checkpoints_or_its_input(run, tmp_path, monkeypatch,
                                                               capsys):
    """Every --out that is a run's own (its folder, config, tb/, a checkpoint) or a tool's own
    input is refused in one line before the work; the run's eval/ and export/ stay writable."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = _files(copy)
    newest = ckpt.latest_valid(copy)
    db = _write_codes(tmp_path / "db.parquet", 16, 20, "ab" * 32)
    q = _write_codes(tmp_path / "q.parquet", 16, 2, "ab" * 32)
    photos = tmp_path / "photos"
    photos.mkdir()
    _png_file(photos / "a.png", np.zeros((8, 8), np.uint8))
    monkeypatch.setattr(report, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    monkeypatch.setattr(export, "export", lambda *a, **k: pytest.fail("exported"))
    monkeypatch.setattr(inference, "encode_to_codes", lambda *a, **k: pytest.fail("encoded"))
    encode = ["--checkpoint", str(copy), "--split", "query", "--out"]
    search = ["--database", str(db), "--query", str(q), "--out"]
    cases = [
        (cli.evaluate_main, ["--checkpoint", str(copy), "--out"], copy,
         "is the folder of a training run"),
        (cli.evaluate_main, ["--checkpoint", str(copy), "--out"], copy / "tb" / "eval",
         f"lies inside {copy / 'tb'}, the run's own"),
        (cli.export_main, ["--checkpoint", str(copy), "--out"], newest,
         f"is the checkpoint {newest}"),
        (cli.encode_main, encode, newest / ckpt.STATE, f"lies inside the checkpoint {newest}"),
        (cli.encode_main, encode, copy / "config.toml", f"is the run {copy}'s own config.toml"),
        (cli.encode_main, encode, copy / "final_metrics.json", "own final_metrics.json"),
        (cli.search_main, search, db, "is the --database input"),
        (cli.search_main, search, q, "is the --query input"),
        (cli.encode_main, ["--checkpoint", str(copy), "--images", str(photos), "--out"],
         photos / "a.png", f"is a file of the --images input {photos}"),
    ]
    inputs = {p: p.read_bytes() for p in (db, q, photos / "a.png")}
    for main, argv, out, says in cases:
        assert main([*argv, str(out)]) == 2, out
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --out {out}: ") and says in err, err
        assert "\n" not in err
    assert _files(copy) == before
    assert all(p.read_bytes() == data for p, data in inputs.items())

    # a codes file in the image folder is output, not input: written again
    monkeypatch.undo()
    codes = photos / "codes.parquet"
    for _ in range(2):
        assert cli.encode_main(["--checkpoint", str(copy), "--images", str(photos), "--out",
                                str(codes), "--quiet"]) == 0
    assert cli.encode_main([*encode, str(copy / "eval" / "q.parquet"), "--quiet"]) == 0


def test_an_out_that_is_a_uri_is_refused_not_made_a_local_folder(centred, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    db = _write_codes(tmp_path / "db.parquet", 16, 20, "ab" * 32)
    uri = "s3://bucket/results.txt"
    assert cli.search_main(["--database", str(db), "--query", str(db), "--out", uri]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {uri}: is a URI; --out names a "
                                               "local results file")
    assert cli.encode_main(["--checkpoint", str(centred), "--split", "query", "--out",
                            "s3://bucket/q.parquet"]) == 2
    assert "is a URI" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [db]  # no folder named s3:


def _interrupt_writes_to(monkeypatch, name: str) -> None:
    """Every file opened for writing whose name starts with `name` (its temporary names too)
    takes half of what is written to it, then the write raises KeyboardInterrupt (Ctrl-C)."""
    import builtins

    real = builtins.open

    class Half:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[:len(data) // 2])
            self.fh.flush()
            raise KeyboardInterrupt

        def __getattr__(self, attr):
            return getattr(self.fh, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def opening(file, mode="r", *args, **kwargs):
        fh = real(file, mode, *args, **kwargs)
        writes = any(c in mode for c in "wax+")
        return Half(fh) if writes and Path(str(file)).name.startswith(name) else fh

    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(io, "open", opening)


def test_outputs_interrupted_mid_write_leave_the_earlier_file_whole(loaded, tmp_path,
                                                                    monkeypatch, capsys):
    import pyarrow.parquet as pq

    db = _write_codes(tmp_path / "db.parquet", 16, 20, "ab" * 32)
    out = tmp_path / "results.txt"
    assert cli.search_main(["--database", str(db), "--query", str(db), "--out", str(out),
                            "--quiet"]) == 0
    good = out.read_bytes()
    with monkeypatch.context() as m:
        _interrupt_writes_to(m, "results.txt")
        assert cli.search_main(["--database", str(db), "--query", str(db), "-k", "3", "--out",
                                str(out), "--quiet"]) == 130
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [
        "db.parquet", "results.txt"]

    # a codes file: pyarrow writes it (not Python's open); Ctrl-C halfway leaves no .tmp
    codes = _write_codes(tmp_path / "codes.parquet", 16, 5, "ab" * 32)
    good = codes.read_bytes()

    def half_then_interrupt(table, where, **kwargs):
        Path(where).write_bytes(good[:len(good) // 2])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pq, "write_table", half_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            _write_codes(codes, 16, 7, "ab" * 32)
    assert codes.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.parquet", "db.parquet",
                                                          "results.txt"]

    # an evaluation stopped on its last file keeps the earlier one's files, tb/ included
    hf, ds = loaded
    ev_dir = tmp_path / "ev"
    ev = report.evaluate(hf, ds, ["fg"])
    report.write(ev_dir, ev, hf, ds, examples=0)
    earlier = _files(ev_dir)
    assert "tb" in {name.split("/")[0] for name in earlier}
    second = dataclasses.replace(ev, metrics={k: v / 2 for k, v in ev.metrics.items()})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_tensorboard", interrupted)  # the last thing written
    with pytest.raises(KeyboardInterrupt):
        report.write(ev_dir, second, hf, ds, examples=0)
    assert _files(ev_dir) == earlier
    assert not [p for p in ev_dir.iterdir() if p.name.startswith(".")]  # no staging left


# ------------------------------------------------------------------- codes files from elsewhere


def test_foreign_codes_files_are_refused_or_shown_for_what_they_hold(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # padding bits past the k-th would count in every XOR + popcount distance
    good = _write_codes(tmp_path / "12.parquet", 12, 3, "ab" * 32)
    codes = codesfile.read(good)
    assert codes.bits == 12 and not (codes.packed[:, 1] & 0x0F).any()
    packed = codes.packed.copy()
    packed[2, 1] |= 0x01
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2), 3,
                                                  [None, pa.py_buffer(packed)])
    bad = tmp_path / "padded.parquet"
    pq.write_table(pq.read_table(good).set_column(1, "code", column), bad)
    assert cli.search_main(["--database", str(bad), "--query", str(good)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {bad}: row 2 sets padding bits (past bit 12) of its last code byte; they must "
        "be 0 (not codes packed by dadh_dist)")

    folder = tmp_path / "codes"
    folder.mkdir()
    assert cli.search_main(["--database", str(folder), "--query", str(good)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {folder}: is a folder, not a codes file"

    # ids that would read as the table's own spacing or lines are quoted; JSON has them as is
    ids = np.array(["a b.png", "two\nlines.png", "tab\t.png", "", "é.png"], dtype=object)
    odd = codesfile.Codes.from_pm1(ids, np.ones((5, 12), np.int8), encoder="f",
                                   model_sha256="ab" * 32)
    result = codesfile.search(odd, odd, 1)
    rows = result.table().splitlines()
    assert len(rows) == 6 and [row.split("  ")[0].strip() for row in rows[1:]] == [
        '"a b.png"', '"two\\nlines.png"', '"tab\\t.png"', '""', "é.png"]
    assert [r["query"] for r in json.loads(result.to_json(odd))["results"]] == ids.tolist()

    # a file name whose bytes are not UTF-8 cannot be a Parquet string id: one line, not
    # pyarrow's traceback after the encoding
    name = "\udcff.png"  # how Python names a file called b"\xff.png"
    with pytest.raises(codesfile.CodesError, match=r"id '\\udcff.png' is not valid UTF-8"):
        codesfile.write(tmp_path / "x.parquet", codesfile.Codes.from_pm1(
            np.array([name], dtype=object), np.ones((1, 12), np.int8), encoder="f",
            model_sha256="ab" * 32))
    assert not list(tmp_path.glob("x.parquet*"))


def test_an_image_named_in_no_utf_8_is_refused_before_encoding(centred, tmp_path, monkeypatch,
                                                                capsys):
    import os

    folder = tmp_path / "photos"
    folder.mkdir()
    _png_file(folder / "a.png", np.zeros((8, 8), np.uint8))
    try:
        _png_file(Path(os.fsdecode(os.fsencode(folder) + b"/\xff.png")), np.zeros((8, 8),
                                                                              np.uint8))
    except OSError:
        pytest.skip("this filesystem takes UTF-8 file names only")
    monkeypatch.setattr(inference, "encode_source", lambda *a, **k: pytest.fail("encoded"))
    out = tmp_path / "codes.parquet"
    assert cli.encode_main(["--checkpoint", str(centred), "--images", str(folder), "--out",
                            str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: '") and "\\udcff.png': file name is not valid UTF-8" in err
    assert "\n" not in err and not out.exists()


def test_search_refuses_a_database_of_another_model_before_encoding_its_images(
        centred, loaded, tmp_path, monkeypatch, capsys):
    hf, _ = loaded
    folder = tmp_path / "photos"
    folder.mkdir()
    _png_file(folder / "a.png", np.zeros((8, 8), np.uint8))
    monkeypatch.setattr(inference, "encode_source", lambda *a, **k: pytest.fail("encoded"))
    for db, says in ((_write_codes(tmp_path / "other.parquet", 16, 5, "0" * 64),
                      f"made by model 000000000000, but the queries ({centred}) by model "
                      f"{hf.model_sha256[:12]}"),
                     (_write_codes(tmp_path / "24.parquet", 24, 5, hf.model_sha256),
                      f"{centred}: 16-bit codes, but {tmp_path / '24.parquet'} holds 24-bit")):
        assert cli.search_main(["--database", str(db), "--query", str(folder), "--checkpoint",
                                str(centred)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err, err


def test_search_of_query_codes_checks_the_checkpoint_given_with_them(centred, loaded, tmp_path,
                                                                     capsys):
    """A codes file as --query with --checkpoint: the checkpoint was ignored, even of another
    model; it is now checked against the codes (nothing is encoded)."""
    hf, _ = loaded
    for sha in (hf.model_sha256, "0" * 64):
        db = _write_codes(tmp_path / f"db_{sha[:4]}.parquet", 16, 20, sha)
        q = _write_codes(tmp_path / f"q_{sha[:4]}.parquet", 16, 3, sha)
        search = ["--database", str(db), "--query", str(q), "-k", "2", "--quiet"]
        assert cli.search_main(search) == 0  # without --checkpoint both pairs search
        capsys.readouterr()
        code = cli.search_main([*search, "--checkpoint", str(centred)])
        captured = capsys.readouterr()
        if sha == hf.model_sha256:  # its own codes: searched as without it
            assert code == 0 and len(captured.out.splitlines()) == 1 + 3 * 2, captured
            continue
        assert code == 2 and captured.out == ""
        assert captured.err == (
            f"error: --checkpoint {centred}: model {hf.model_sha256[:12]} (16 bits), but {q} "
            "holds codes of model 000000000000 (16 bits); name the checkpoint_* folder that "
            "made them (a run folder means its newest), or drop --checkpoint\n")


def test_a_single_pq_shard_is_read_as_image_shards(centred, loaded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hf, ds = loaded
    blobs = []
    for image in ds.query.images[:3, 0]:
        png = io.BytesIO()
        Image.fromarray(image).save(png, "PNG")
        blobs.append(png.getvalue())
    shard = tmp_path / "part-0.pq"
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "id": [7, 8, 9]}), shard)
    out = tmp_path / "codes.parquet"
    assert cli.encode_main(["--checkpoint", str(centred), "--images", str(shard), "--out",
                            str(out), "--quiet"]) == 0
    codes = codesfile.read(out)
    assert codes.ids.tolist() == [7, 8, 9]
    np.testing.assert_array_equal(codes.pm1(), hf.codes(ds.query.images[:3], "fg"))


# ----------------------------------------------------------------- runs that are not finished


def test_a_run_stopped_before_its_first_checkpoint_says_so_local_or_uri(run, tmp_path, capsys):
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(run / "config.toml", early / "config.toml")
    for given in (str(early), f"file://{early}"):
        assert cli.evaluate_main(["--checkpoint", given]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {given}: the run has no valid checkpoint yet (training stopped "
                       "before its first, or has not reached it; checkpoints come every "
                       "train.checkpoint_every outer iterations)"), err
    # a folder that is no run at all is still called that
    assert cli.export_main(["--checkpoint", str(tmp_path)]) == 2
    assert "holds no valid checkpoint_* folder" in capsys.readouterr().err


def test_a_checkpoint_the_run_removes_while_it_is_read_is_read_again_or_said(
        run, tmp_path, monkeypatch, capsys):
    """A run still training prunes its older checkpoints: the one a tool chose may go while
    it is read. A run folder's newest is chosen again, once, with a warning; a checkpoint named
    itself, or a second one gone, is one line naming it (it was "No such file or directory",
    or a "missing manifest" that called the checkpoint incomplete)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = ckpt.latest_valid(copy)
    older = max(p for p in copy.glob("checkpoint_*") if p != newest)
    real_load, real_verify = ckpt.load, ckpt.verify
    removed: list[Path] = []

    def pruning(times: int):
        """ckpt.load that removes the first `times` checkpoints it opens, as it opens them."""
        def load(folder, *args, **kwargs):
            if len(removed) < times:
                removed.append(Path(folder))
                shutil.rmtree(folder)
            return real_load(folder, *args, **kwargs)

        return load

    monkeypatch.setattr(ckpt, "load", pruning(1))
    hf = inference.load(copy)
    assert removed == [newest] and hf.checkpoint == older
    assert capsys.readouterr().err == (f"warning: {newest.name} was removed while being read "
                                       "(the run is still training?); reading its newest now, "
                                       f"{older.name}\n")

    # the newest chosen again goes too: one line naming it
    shutil.rmtree(copy)
    shutil.copytree(run, copy)
    removed.clear()
    monkeypatch.setattr(ckpt, "load", pruning(2))
    assert cli.evaluate_main(["--checkpoint", str(copy)]) == 2
    assert removed == [newest, older]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {older}: was removed while being read (is the run still training? rerun to "
        "take its newest)")

    # named itself, and removed after its check, as its state.pt is read
    shutil.rmtree(copy)
    shutil.copytree(run, copy)

    def pruned_after_check(folder):
        manifest = real_verify(folder)
        shutil.rmtree(folder)
        return manifest

    monkeypatch.setattr(ckpt, "load", real_load)
    monkeypatch.setattr(ckpt, "verify", pruned_after_check)
    assert cli.evaluate_main(["--checkpoint", str(newest), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == (
        f"{newest}: was removed while being read (is its run still training? it keeps only "
        "its newest checkpoints: name the run folder to take its newest)")


# -------------------------------------------------------------------------------- export


def test_export_takes_program_weights_and_check_from_the_cpu_copy(loaded, tmp_path,
                                                                  monkeypatch):
    """A run on a GPU exports from its CPU copy (`export.on_cpu`): streams.pt then loads on a
    machine without one. Here the copy differs from the streams (a shifted bias) so that what
    came from which shows."""
    import copy

    hf, _ = loaded

    def cpu_copy(h):
        if h.device.type == "cpu":
            return h
        f, g = copy.deepcopy(h.f), copy.deepcopy(h.g)
        with torch.no_grad():
            f.head.bias.add_(0.5)
        return dataclasses.replace(h, f=f, g=g, device=torch.device("cpu"))

    monkeypatch.setattr(export, "on_cpu", cpu_copy)
    on_gpu = dataclasses.replace(hf, device=torch.device("cuda"))  # named, never used
    paths = export.export(on_gpu, "fg", tmp_path / "e")  # the round trip checks the program
    saved = torch.load(paths["weights"], weights_only=True)
    torch.testing.assert_close(saved["f"]["head.bias"], hf.f.head.bias + 0.5)
    torch.testing.assert_close(saved["g"]["head.bias"], hf.g.head.bias)


def test_an_export_killed_mid_way_leaves_a_staging_folder_the_next_export_removes(tmp_path):
    """A SIGKILLed export never reaches its cleanup: its `.export-<host>-<pid>-*` folder stayed
    in --out for good. The next export into the folder from the same host removes those of
    processes that are gone, and leaves a live process's, any name without a process id, and
    another host's (an --out on shared storage, where the same pid is another process)."""
    import socket

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    out = tmp_path / "out"
    here = export._host_prefix()
    assert here.startswith(".export-") and here.count("-") == 2, here
    left = {f"{here}{gone}-abc": False, f"{here}{os.getpid()}-live": True, f"{here}x": True,
            f"{here[:-1]}_1-{gone}-abc": True,  # a host named <this host>-1, as it names it
            f".export-{socket.gethostname()}x-{gone}-abc": True}
    for name in left:
        (out / name).mkdir(parents=True)
        (out / name / "hash_fg.pt2").write_bytes(b"half")
    with export.staging_for(out) as staging:
        assert staging.name.startswith(f"{here}{os.getpid()}-")
    assert {name: (out / name).exists() for name in left} == left
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n, kept in left.items() if kept)
