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


def _manifest_of(folder: Path, **changes) -> None:
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest.update(changes)
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_garbage_manifests_are_refused_and_skipped(tmp_path):
    run = tmp_path / "run"
    good = ckpt.save(run / "checkpoint_000001", {"t": 1}, "x = 1\n", "fp")
    digests = json.loads((good / ckpt.MANIFEST).read_text())["files"]
    garbage = {  # each newer than the good one, were its t believed
        "checkpoint_000002": {"files": list(digests)},
        "checkpoint_000003": {"t": "3"},
        "checkpoint_000004": {"t": 4, "files": {}},  # vouches for nothing: state.pt unchecked
        "checkpoint_000005": {"t": 5, "codes": {"shape": [4, 2], "blocks": [[0, 4, "b.npy"]]}},
        "checkpoint_000006": {"t": 6, "codes": {"shape": [4, 2], "blocks": [[0, 3, "state.pt"]]}},
    }
    for name, changes in garbage.items():
        shutil.copytree(good, run / name)
        _manifest_of(run / name, **changes)
        with pytest.raises(ckpt.CheckpointError, match=rf"{name}/manifest.json: unreadable"):
            ckpt.verify(run / name)
    warnings = []
    assert ckpt.latest_valid(run, warn=warnings.append) == good
    assert len(warnings) == len(garbage), warnings


def test_unreadable_checkpoint_is_refused_and_skipped(tmp_path, monkeypatch):
    """Another user's file (mode 0600) refuses its checkpoint, as a corrupt one (faked: the tests
    run as root, whom no mode stops)."""
    run = tmp_path / "run"
    ckpt.save(run / "checkpoint_000001", {"t": 1}, "x = 1\n", "fp")
    newest = ckpt.save(run / "checkpoint_000002", {"t": 2}, "x = 1\n", "fp")
    sha256 = ckpt._sha256

    def denied(path: Path) -> str:
        if path == newest / ckpt.STATE:
            raise PermissionError(13, "Permission denied", str(path))
        return sha256(path)

    monkeypatch.setattr(ckpt, "_sha256", denied)
    with pytest.raises(ckpt.CheckpointError,
                       match=rf"^{newest / ckpt.STATE}: cannot be read \(Permission denied\)$"):
        ckpt.verify(newest)
    warnings = []
    assert ckpt.latest_valid(run, warn=warnings.append).name == "checkpoint_000001"
    assert len(warnings) == 1 and "cannot be read" in warnings[0]


def test_write_atomic_on_a_full_disk_and_with_writers_at_once(tmp_path, monkeypatch):
    import threading

    path = tmp_path / "config.toml"
    path.write_bytes(b"old")
    with monkeypatch.context() as m:
        m.setattr(ckpt.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space")))
        with pytest.raises(OSError, match="No space"):
            ckpt.write_atomic(path, b"new" * 1000)
    # the old file whole, and no half-written temporary file holding the disk
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"] and path.read_bytes() == b"old"

    errors = []

    def write(i: int) -> None:
        try:
            for _ in range(50):
                ckpt.write_atomic(path, bytes([i]) * 200_000)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    data = path.read_bytes()
    assert len(data) == 200_000 and len(set(data)) == 1  # one writer's whole file
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_fetch_takes_a_checkpoint_replaced_at_the_uri_not_the_old_copy(tmp_path):
    """A run started again under the same URI (the old one deleted there) writes a checkpoint of
    the same name: a machine that holds the old one's copy must fetch the new one."""
    remote = f"file://{tmp_path / 'remote'}"
    name = "checkpoint_000001"
    for x in (1, 2):
        ckpt.save(tmp_path / f"c{x}", {"t": 1, "x": x}, f"x = {x}\n", f"fp{x}")
    mirror = tmp_path / "mirror"
    storage.upload_checkpoint(tmp_path / "c1", uris.join(remote, "run", name))
    assert ckpt.load(storage.latest_valid(uris.join(remote, "run"), mirror))[0]["x"] == 1
    uris.delete_dir(uris.join(remote, "run"))
    storage.upload_checkpoint(tmp_path / "c2", uris.join(remote, "run", name))
    found = storage.latest_valid(uris.join(remote, "run"), mirror)
    assert found == mirror / name and ckpt.load(found)[0]["x"] == 2
    # a copy that is the remote one is reused, not downloaded again
    stamp = (found / ckpt.STATE).stat().st_mtime_ns
    assert storage.fetch_checkpoint(uris.join(remote, "run", name), found) == found
    assert (found / ckpt.STATE).stat().st_mtime_ns == stamp


def test_mirror_is_per_user(monkeypatch):
    """Two users of one machine: the first one's folder in the shared temporary directory is
    not writable by the second."""
    import tempfile

    monkeypatch.delenv("DADH_MIRROR_DIR", raising=False)
    run = "s3://b/runs/r"
    by_user = {}
    for uid in (1000, 1001):
        monkeypatch.setattr(storage.os, "getuid", lambda uid=uid: uid)
        by_user[uid] = storage.mirror_dir(run)
    assert by_user[1000] != by_user[1001]
    assert by_user[1000].parent.parent == Path(tempfile.gettempdir())
    assert by_user[1000].parent.name != by_user[1001].parent.name


def test_skipped_checkpoint_warnings_do_not_go_through_print(tmp_path, monkeypatch, capsys):
    """Ray patches print in its workers to log the line too: it reached the driver twice."""
    import builtins

    ckpt.save(tmp_path / "run" / "checkpoint_000001", {"t": 1}, "x = 1\n", "fp")
    (tmp_path / "run" / "checkpoint_000002").mkdir()  # a save cut short before its manifest
    bad = tmp_path / "remote" / "checkpoint_000003" / ckpt.MANIFEST
    bad.parent.mkdir(parents=True)
    bad.write_text("{")
    printed = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: printed.append(a))
    assert ckpt.latest_valid(tmp_path / "run").name == "checkpoint_000001"
    assert storage.checkpoints(f"file://{tmp_path / 'remote'}") == []
    assert printed == []
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: skipping checkpoint: ") for line in err)
    assert "checkpoint_000002" in err[0] and "checkpoint_000003" in err[1]


def test_remote_run_resumes_on_its_data_moved_and_refuses_other_data(tmp_path, s3, capsys):
    """The data record travels with a remote run: from a fresh mirror (another machine), a
    moved copy of the run's data is taken, and other files at the new root are refused."""
    def cfg_at(root):
        return config.load(DEBUG, _overrides(s3("moved/runs"), "m", "data.source=list",
                                             f"data.root={json.dumps(str(root))}"))

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for split in ("test.txt", "database.txt"):
            (tmp_path / name / split).write_text(f"{split}.png 1 0\n")
    runner.prepare_run(cfg_at(tmp_path / "a"))
    run = s3("moved/runs/m")
    assert json.loads(uris.read_bytes(uris.join(run, "data.json")))["root"] == str(tmp_path / "a")
    # a checkpoint at the URI makes the saved config binding (its content is not read here)
    uris.write_bytes(uris.join(run, "checkpoint_000001", ckpt.MANIFEST), b'{"t": 1}')
    shutil.rmtree(runner.folders.run_folder(cfg_at(tmp_path / "a")))  # another machine
    capsys.readouterr()
    runner.prepare_run(cfg_at(tmp_path / "b"))
    assert "data.root moved from" in capsys.readouterr().out
    (tmp_path / "saved.toml").write_bytes(uris.read_bytes(uris.join(run, "config.toml")))
    assert config.load(tmp_path / "saved.toml").data.root == str(tmp_path / "b")
    (tmp_path / "a" / "test.txt").write_text("other.png 1 0\n")
    with pytest.raises(ConfigError, match=r"differ from those the run recorded \(test.txt\)$"):
        runner.prepare_run(cfg_at(tmp_path / "a"))
