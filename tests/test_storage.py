"""Runs stored behind a URI (storage.py): an S3 endpoint on 127.0.0.1 (moto), no Ray.

A remote run must behave like a local one: same files, same B, resume by name from any machine
(a fresh mirror), refusal of a changed config, fallback past a corrupt or half-sent checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from _repo import DEBUG
from _s3 import bucket

from dadh_dist import checkpoint as ckpt
from dadh_dist import cli, config, inference, storage, uris
from dadh_dist import run as runner
from dadh_dist.config import ConfigError


def _overrides(run_dir, name, *extra):
    return ["scaling.use_ray=false", f"log.run_dir={json.dumps(str(run_dir))}",
            f"log.name={name}", "train.outer_iters=3", *extra]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    mirrors = tmp_path_factory.mktemp("mirrors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DADH_MIRROR_DIR", str(mirrors))
        with bucket() as uri:
            yield uri


def test_uri_helpers():
    u = "s3://b/runs?endpoint_override=h:9&scheme=http"
    assert uris.join(u, "r", "/x/") == "s3://b/runs/r/x?endpoint_override=h:9&scheme=http"
    assert uris.split(uris.join(u, "r")) == (u, "r")
    assert uris.redact("s3://key:secret@b/p") == "s3://***@b/p"
    assert uris.redact("s3://key:se/cret@b/p") == "s3://***@b/p"  # a secret may hold '/'
    with pytest.raises(uris.StorageError) as e:
        uris.read_bytes("s3://key:wJal/K7MD@b/p/config.toml")
    assert "carries a secret" in str(e.value) and "wJal" not in str(e.value)
    assert uris.is_uri("gs://b") and not uris.is_uri("/tmp/runs")
    a, b = storage.mirror_dir(uris.join(u, "r")), storage.mirror_dir(uris.join(u, "q"))
    assert a != b and a.name.startswith("r-") and a == storage.mirror_dir(uris.join(u, "r"))


def test_unopenable_uri_is_one_line_error(tmp_path, capsys):
    code = cli.train_main(["--config", str(DEBUG),
                           *_overrides("nosuchscheme://bucket/runs", "x")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: nosuchscheme://bucket/runs/x/config.toml: cannot open")


def test_remote_run_equals_local_and_resumes_anywhere(tmp_path, s3):
    local = runner.run_local(config.load(DEBUG, _overrides(tmp_path, "r")))
    remote_cfg = config.load(DEBUG, _overrides(s3("team/runs"), "r"))
    # a config saved at the URI with no checkpoint beside it (a run that stopped on bad data)
    # gives way to the next one
    runner.prepare_run(config.load(DEBUG, _overrides(s3("team/runs"), "r", "objective.eta=3")))
    remote = runner.run_local(remote_cfg)
    run = s3("team/runs/r")
    assert remote["run_dir"] == run
    for key in ("map_all_f", "map_all_g", "map_all_fg", "p_at_1000_fg"):
        assert remote[key] == local[key], key

    files = dict(uris.list_files(run))
    assert {"config.toml", "final_metrics.json"} <= set(files)
    assert any(f.startswith("tb/events.out.tfevents") for f in files)
    assert not any(f.startswith(".") or "/." in f for f in files), files  # no fault markers
    # the newest KEEP_CHECKPOINTS checkpoints, each complete
    assert [name for _, name in storage.checkpoints(run)] == ["checkpoint_000003",
                                                              "checkpoint_000002"]
    assert json.loads(uris.read_bytes(uris.join(run, "final_metrics.json")))[
        "map_all_fg"] == remote["map_all_fg"]

    # another machine: no mirror at all; the run resumes (here: is already finished) from S3
    shutil.rmtree(runner.run_folder(remote_cfg))
    folder, resume = runner.prepare_run(remote_cfg)
    assert resume == folder / "checkpoint_000003"
    B_local, _ = ckpt.load(tmp_path / "r" / "checkpoint_000003")
    B_remote, _ = ckpt.load(resume)
    assert torch.equal(B_local["B"], B_remote["B"])
    again = runner.run_local(remote_cfg)
    assert again["resumed_at"] == 3 and again["map_all_fg"] == remote["map_all_fg"]

    changed = config.load(DEBUG, _overrides(s3("team/runs"), "r", "objective.gamma=5"))
    with pytest.raises(ConfigError, match=r"run 'r' already exists in s3://runs/team/runs\?.*"
                                          r"objective.gamma"):
        runner.prepare_run(changed)

    # encode and search straight from the URI: the same codes as from the local run
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    hf_remote, hf_local = inference.load(run), inference.load(tmp_path / "r")
    assert hf_remote.t == hf_local.t == 3
    assert (hf_remote.codes(images, "fg") == hf_local.codes(images, "fg")).all()

    # evaluate a remote run: its report lands next to the run, as for a local run
    assert cli.evaluate_main(["--checkpoint", run, "--examples", "0", "--no-tensorboard"]) == 0
    sent = dict(uris.list_files(uris.join(run, "eval")))
    assert {"checkpoint_000003_query/metrics.json", "checkpoint_000003_query/report.md"} \
        <= set(sent), sent


def test_corrupt_or_half_sent_remote_checkpoint_is_skipped(tmp_path, s3):
    cfg = config.load(DEBUG, _overrides(s3("c"), "c", "train.outer_iters=2"))
    runner.run_local(cfg)
    run = s3("c/c")
    newest = uris.join(run, "checkpoint_000002")
    state = bytearray(uris.read_bytes(uris.join(newest, "state.pt")))
    state[len(state) // 2] ^= 0xFF
    uris.write_bytes(uris.join(newest, "state.pt"), bytes(state))
    warnings = []
    found = storage.latest_valid(run, tmp_path / "m1", warn=warnings.append)
    assert found == tmp_path / "m1" / "checkpoint_000001"
    assert "checkpoint_000002" in warnings[0] and "do not match the manifest" in warnings[0]

    # an upload cut short before its manifest: not listed at all
    uris.write_bytes(uris.join(run, "checkpoint_000009", "state.pt"), b"partial")
    assert [t for t, _ in storage.checkpoints(run)] == [2, 1]
    # a manifest whose files never arrived
    uris.write_bytes(uris.join(run, "checkpoint_000001", "state.pt"), b"")
    uris.delete_dir(uris.join(run, "checkpoint_000002"))
    warnings.clear()
    assert storage.latest_valid(run, tmp_path / "m2", warn=warnings.append) is None
    assert "checkpoint_000001" in warnings[0]


def test_upload_the_store_did_not_keep_whole_prunes_nothing(tmp_path, s3, monkeypatch):
    # a store that acknowledges the third checkpoint's state.pt but keeps a short copy
    send = uris.upload_file

    def short_copy(local: Path, uri: str) -> None:
        if "/checkpoint_000003/state.pt?" in uri:
            uris.write_bytes(uri, local.read_bytes()[:100])
        else:
            send(local, uri)

    monkeypatch.setattr(uris, "upload_file", short_copy)
    cfg = config.load(DEBUG, _overrides(s3("u"), "u"))
    with pytest.raises(uris.StorageError,
                       match=r"checkpoint_000003/state.pt\?\S*: upload not confirmed \(100 of \d+ "
                             r"bytes\); older checkpoints kept$"):
        runner.run_local(cfg)
    run = s3("u/u")
    # t = 3 would have pruned checkpoint 1 (two are kept): both earlier ones are still there
    assert [t for t, _ in storage.checkpoints(run)] == [3, 2, 1]
    warnings = []
    found = storage.latest_valid(run, tmp_path / "m", warn=warnings.append)
    assert found == tmp_path / "m" / "checkpoint_000002" and "checkpoint_000003" in warnings[0]


def _fetch(args: tuple[str, str]) -> str:
    return str(storage.fetch_checkpoint(args[0], Path(args[1])))


def test_workers_fetching_one_checkpoint_at_once_share_one_copy(tmp_path, s3):
    """Every worker of a machine fetches the resume checkpoint into the same mirror folder."""
    import multiprocessing

    ckpt.save(tmp_path / "c", {"t": 1, "B": torch.ones(2000, 32)}, "x = 1\n", "fp")
    uri = s3("race/r/checkpoint_000001")
    storage.upload_checkpoint(tmp_path / "c", uri)
    local = tmp_path / "mirror" / "checkpoint_000001"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        got = pool.map(_fetch, [(uri, str(local))] * 3)
    assert got == [str(local)] * 3
    assert ckpt.verify(local)["t"] == 1
    # no download folder left behind (the lock file between the processes stays)
    assert sorted(p.name for p in local.parent.iterdir()) == [".checkpoint_000001.lock",
                                                              "checkpoint_000001"]


def test_publisher_sends_what_changed_and_leaves_checkpoints_and_config(tmp_path):
    mirror, remote = tmp_path / "mirror", tmp_path / "remote"
    (mirror / "tb").mkdir(parents=True)
    (mirror / "checkpoint_000001").mkdir()
    remote.mkdir()
    (mirror / "config.toml").write_text("[log]\n")  # the driver sent it when the run opened
    (mirror / "tb" / "events").write_bytes(b"1")
    (mirror / "checkpoint_000001" / "state.pt").write_bytes(b"x")
    (mirror / ".fault").write_text("")
    publish = storage.Publisher(mirror, f"file://{remote}")
    assert publish() == 1
    assert sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()) \
        == ["tb/events"]
    assert publish() == 0
    (mirror / "tb" / "events").write_bytes(b"12")
    (mirror / "final_metrics.json").write_text("{}")
    assert publish() == 2
    assert (remote / "tb" / "events").read_bytes() == b"12"
