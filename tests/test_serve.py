"""The retrieval service (dadh_dist.serve) on Ray Serve, against jobs/search.py on the same images.

One short debug run is trained for the module and one service (two replicas, loopback, a free
port) answers every HTTP check; Serve and Ray are shut down whatever happens. The checks that
need no server (start-up refusals, exports, the builder's arguments) run on the plain objects.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from _repo import DEBUG, ROOT, job
from PIL import Image

from dadh_dist import checkpoint as ckpt
from dadh_dist import cli, codesfile, config, export, inference
from dadh_dist import run as runner
from dadh_dist import serve as serving
from dadh_dist.run.session import loopback_only

pytestmark = pytest.mark.slow

K = 25
QUERIES = 12
MAX_IMAGES = 16
MAX_BODY = 1 << 16


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A checkpoint of the debug run after one short outer iteration, each stream's hash layer
    moved so that its outputs are centred on the database images: one iteration alone leaves a
    handful of distinct codes, under which a service that mixed images up could still pass."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = config.load(DEBUG, ["scaling.use_ray=false", f"log.run_dir={json.dumps(str(tmp))}",
                              "log.name=serve", "log.tensorboard=false", "train.outer_iters=1",
                              "train.inner_epochs=1", "train.num_samples=256"])
    hf, ds = inference.load_with_data(runner.run_local(cfg)["run_dir"])
    state, manifest = ckpt.load(hf.checkpoint)
    x = torch.from_numpy(ds.database.images)
    with torch.no_grad():
        for name in ("f", "g"):
            stream = getattr(hf, name)
            features = stream.backbone(stream.preprocess(x))
            stream.head.bias.sub_(stream.head(features).mean(0))
            state[name] = stream.state_dict()
    folder = tmp / "centred" / "checkpoint_000001"
    ckpt.save(folder, state, hf.cfg.to_toml(), manifest["fingerprint"])
    return folder


@pytest.fixture(scope="module")
def queries(run, tmp_path_factory) -> dict[str, bytes]:
    """Query-split images of the run as PNG files (name -> bytes), in a folder of their own."""
    _, ds = inference.load_with_data(run)
    folder = tmp_path_factory.mktemp("queries")
    files = {}
    for i in range(QUERIES):
        name = f"q{i:02d}.png"
        files[name] = _png(ds.query.images[i][0])
        (folder / name).write_bytes(files[name])
    return files


@pytest.fixture(scope="module")
def reference(run, queries, tmp_path_factory) -> dict[str, dict]:
    """jobs/search.py's answer (name -> its JSON result) for the query files against the run's
    learned B, which is also what the service searches by default."""
    tmp = tmp_path_factory.mktemp("reference")
    db = tmp / "db.parquet"
    assert cli.encode_main(["--checkpoint", str(run), "--split", "database", "--learned",
                            "--out", str(db), "--quiet"]) == 0
    folder = tmp / "queries"
    folder.mkdir()
    for name, data in queries.items():
        (folder / name).write_bytes(data)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.search_main(["--database", str(db), "--query", str(folder), "--checkpoint",
                                str(run), "-k", str(K), "--json", "--quiet"]) == 0
    return {r["query"]: r for r in json.loads(out.getvalue())["results"]}


@pytest.fixture(scope="module")
def service(run):
    """The base URL of the service: Ray on loopback with 2 CPUs, two replicas of one CPU."""
    import ray
    from ray import serve

    port = _free_port()
    options = serving.Options(checkpoint=str(run), port=port, replicas=2,
                              max_images=MAX_IMAGES, max_body_bytes=MAX_BODY, batch_wait_s=0.05)
    loopback_only()
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(serving.build(options), name=serving.APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _post(url: str, **kwargs) -> requests.Response:
    return requests.post(url, timeout=60, **kwargs)


def _files(items) -> list:
    return [("image", (name, data, "image/png")) for name, data in items]


# ------------------------------------------------------------------------------------- answers


def test_service_answers_as_jobs_search(service, run, queries, reference):
    hf, ds = inference.load_with_data(run)
    info = requests.get(f"{service}/info", timeout=30).json()
    assert info["bits"] == hf.bits == 16 and info["encoder"] == "fg"
    assert info["model_sha256"] == hf.model_sha256
    assert info["database_size"] == len(ds.database) == len(hf.B)
    assert info["backend"] == ("faiss" if _has_faiss() else "packed")
    assert requests.get(f"{service}/healthz", timeout=30).json() == {"status": "ok"}

    # multipart files, k as a form field: jobs/search.py's ids and distances, ties included
    resp = _post(f"{service}/search", files=_files(queries.items()), data={"k": str(K)})
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["k"] == K and [r["query"] for r in got["results"]] == list(queries)
    for r in got["results"]:
        want = reference[r["query"]]
        assert (r["ids"], r["distances"]) == (want["ids"], want["distances"]), r["query"]
    rows = [r["distances"] for r in got["results"]]
    assert any(len(set(d)) < len(d) for d in rows)  # ties inside the top-k: their order counts
    assert len({tuple(d) for d in rows}) > QUERIES // 2  # not one ranking for every image

    # the code is the query's: sign(f + g) of the image, bit c = character c
    want_codes = hf.codes(ds.query.images[:QUERIES], "fg")
    assert [r["code"] for r in got["results"]] == [
        "".join("1" if v > 0 else "0" for v in row) for row in want_codes]
    encoded = _post(f"{service}/encode", files=_files(queries.items())).json()
    assert [r["code"] for r in encoded["results"]] == [r["code"] for r in got["results"]]
    assert "ids" not in encoded["results"][0] and encoded["model_sha256"] == hf.model_sha256

    # base64 JSON with ids, and one raw image body with k as a query parameter
    names = list(queries)[:5]
    doc = {"images": [base64.b64encode(queries[n]).decode() for n in names], "ids": names,
           "k": 7}
    got = _post(f"{service}/search", json=doc).json()["results"]
    assert [(r["query"], r["ids"], r["distances"]) for r in got] == [
        (n, reference[n]["ids"][:7], reference[n]["distances"][:7]) for n in names]
    raw = _post(f"{service}/search?k=3", data=queries[names[0]],
                headers={"Content-Type": "image/png"}).json()["results"]
    assert raw[0]["ids"] == reference[names[0]]["ids"][:3]


def test_concurrent_requests_are_batched_into_shared_forward_passes(service, queries, reference):
    names = list(queries)

    def one(i: int) -> requests.Response:
        name = names[i % len(names)]
        return _post(f"{service}/search?k={K}", files=_files([(name, queries[name])]))

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(32)))
    assert [r.status_code for r in responses] == [200] * 32
    for r in responses:
        result = r.json()["results"][0]
        assert result["ids"] == reference[result["query"]]["ids"]
    batches = [int(r.headers[serving.BATCH_HEADER]) for r in responses]
    assert max(batches) > 1, batches  # some requests shared one forward pass


def test_bad_input_gets_a_one_line_4xx(service, queries):
    image = next(iter(queries.values()))
    png = {"Content-Type": "image/png"}
    cases = [  # (what, status, needle in the message, request)
        ("not an image", 422, "not an image",
         lambda: _post(f"{service}/search", files=_files([("cat.png", b"GIF89a-not-really")]))),
        ("colour for a gray model", 422, "colour image",  # red: black would be gray
         lambda: _post(f"{service}/search", data=_png(np.full((8, 8, 3), (255, 0, 0), np.uint8)),
                       headers=png)),
        ("wrong size", 422, "9x9 px",
         lambda: _post(f"{service}/encode", data=_png(np.zeros((9, 9), np.uint8)), headers=png)),
        ("too many images", 413, f"the limit is {MAX_IMAGES}",
         lambda: _post(f"{service}/search", files=_files([("a.png", image)] * (MAX_IMAGES + 1)))),
        ("k = 0", 422, "k: must be in 1..",
         lambda: _post(f"{service}/search?k=0", data=image, headers=png)),
        ("k above the database", 422, "(the database size), got 100000",
         lambda: _post(f"{service}/search", json={"images": [base64.b64encode(image).decode()],
                                                  "k": 100000})),
        ("k not a number", 400, "k: must be an integer",
         lambda: _post(f"{service}/search?k=ten", data=image, headers=png)),
        ("body over the limit", 413, "--max-body-bytes",
         lambda: _post(f"{service}/search", data=b"\0" * (MAX_BODY + 1), headers=png)),
        ("chunked body over the limit", 413, "--max-body-bytes",
         lambda: _post(f"{service}/search", data=iter([b"\0" * 40000] * 3), headers=png)),
        ("not JSON", 400, "not JSON",
         lambda: _post(f"{service}/search", data=b"{", headers={"Content-Type":
                                                                 "application/json"})),
        ("not base64", 400, "images[0]: not base64",
         lambda: _post(f"{service}/search", json={"images": ["%%%"]})),
        ("no images", 400, "no images",
         lambda: _post(f"{service}/search", json={"images": []})),
        ("unknown content type", 415, "text/plain",
         lambda: _post(f"{service}/search", data=b"x", headers={"Content-Type": "text/plain"})),
        ("unknown endpoint", 404, "no such endpoint",
         lambda: requests.get(f"{service}/nearest", timeout=30)),
        ("wrong method", 405, "use POST", lambda: requests.get(f"{service}/search", timeout=30)),
        ("k twice", 400, "k: given 2 times in the query",
         lambda: _post(f"{service}/search?k=1&k=2", data=image, headers=png)),
    ]
    for what, status, needle, send in cases:
        resp = send()
        assert resp.status_code == status, (what, resp.status_code, resp.text)
        error = resp.json()["error"]
        assert needle in error and "\n" not in error and "Traceback" not in error, (what, error)
    # the service still answers after all of them
    assert _post(f"{service}/encode", data=image, headers=png).status_code == 200
    head = requests.head(f"{service}/healthz", timeout=30)  # as health checkers ask
    assert (head.status_code, head.content) == (200, b""), head.headers


# ---------------------------------------------------------------------------- start-up, no server


def test_start_up_refuses_a_database_of_other_bits_or_another_model(run, tmp_path):
    hf = inference.load(run)
    model = serving.load_model(run)
    other_bits = codesfile.Codes.from_pm1(np.arange(4), np.ones((4, 8), np.int8), encoder="B",
                                          model_sha256=hf.model_sha256)
    other_model = codesfile.Codes.from_pm1(np.arange(4), hf.B[:4], encoder="B",
                                           model_sha256="0" * 64)
    for codes, needle in ((other_bits, "8-bit codes, but"), (other_model, "made by model 000")):
        path = codesfile.write(tmp_path / "db.parquet", codes)
        with pytest.raises(codesfile.CodesError, match=needle):
            serving.load_database(serving.Options(checkpoint=str(run), database=str(path)), model)
    # the command line says it in one line and exits 2, before Ray starts
    proc = job("serve", "--checkpoint", run, "--database", path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: made by model 000"), lines


def test_help_loads_neither_ray_nor_torch():
    code = ("import sys\nfrom dadh_dist import serve\ntry:\n    serve.main(['--help'])\n"
            "except SystemExit:\n    pass\nassert not {'ray', 'torch'} & set(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and "--max-body-bytes" in proc.stdout, proc.stderr


def test_an_export_serves_the_checkpoints_codes_and_database(run, queries, tmp_path,
                                                             monkeypatch):
    hf, ds = inference.load_with_data(run)
    export.export(hf, "f", tmp_path / "export")
    model = serving.load_model(tmp_path / "export")
    assert (model.encoder, model.model_sha256, model.bits) == ("f", hf.model_sha256, 16)
    images = ds.query.images[:QUERIES]
    np.testing.assert_array_equal(model.codes(images), hf.codes(images, "f"))
    options = serving.Options(checkpoint=str(tmp_path / "export"), backend="packed")
    database = serving.load_database(options, model)  # the learned B of the export's checkpoint
    np.testing.assert_array_equal(database.pm1(), hf.B)
    status, doc = serving.Service(options, database, model).handle(
        "POST", "/search", json.dumps({"images": [base64.b64encode(b).decode()
                                                  for b in queries.values()]}).encode(),
        "application/json")
    assert status == 200 and doc["encoder"] == "f" and doc["k"] == serving.DEFAULT_K
    with pytest.raises(config.ConfigError, match="computes f, not fg"):
        serving.load_model(tmp_path / "export", "fg")
    # /info names the files without the server's folders
    info = serving.Service(options, database, model).info()
    assert info["checkpoint"] == "export" and info["database"] == f"learned B of {run.name}"
    assert str(tmp_path) not in json.dumps(info) and str(run.parent) not in json.dumps(info)

    # an export written before checkpoints were recorded absolute holds the path as given,
    # relative to the working directory of jobs/export.py (here: a folder above both)
    base = Path(os.path.commonpath([run, tmp_path]))
    meta_file = tmp_path / "export" / "export.json"
    assert Path(json.loads(meta_file.read_text())["checkpoint"]) == run.resolve()
    meta = json.loads(meta_file.read_text())
    meta["checkpoint"] = os.path.relpath(run, base)
    meta_file.write_text(json.dumps(meta))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (base, elsewhere):  # where it worked before, and from another folder
        monkeypatch.chdir(cwd)
        model = serving.load_model(tmp_path / "export")
        assert model.run_checkpoint.resolve() == run.resolve(), cwd
        np.testing.assert_array_equal(serving.load_database(options, model).pm1(), hf.B)


def test_resize_takes_any_geometry_as_jobs_search_decodes_it(run):
    hf = inference.load(run)
    options = serving.Options(checkpoint=str(run), resize=True)
    model = serving.load_model(run)
    service = serving.Service(options, serving.load_database(options, model), model)
    gen = np.random.default_rng(4)
    blob = _png(gen.integers(0, 256, (20, 13, 3), dtype=np.uint8))  # colour, 13x20 px
    status, doc = service.handle("POST", "/encode", blob, "image/png")
    assert status == 200, doc
    want = hf.codes(inference.decode(blob, 1, 8, "x")[None], "fg")[0]
    assert doc["results"][0]["code"] == "".join("1" if v > 0 else "0" for v in want)


def test_the_serve_run_builder_takes_string_arguments(run):
    options = serving.Options.from_args({"checkpoint": str(run), "replicas": "2",
                                         "max-images": "4", "resize": "true"})
    assert (options.replicas, options.max_images, options.resize) == (2, 4, True)
    for args, needle in (({"checkpoint": str(run), "replica": "2"}, "replica: unknown"),
                         ({"checkpoint": str(run), "port": "http"}, "port: expected int"),
                         ({"replicas": "2"}, "checkpoint: required"),
                         ({"checkpoint": str(run), "max_images": "0"}, "--max-images: must")):
        with pytest.raises(config.ConfigError, match=needle):
            serving.Options.from_args(args)
    deployment_app = serving.app({"checkpoint": str(run), "replicas": "2"})
    from ray.serve import Application

    assert isinstance(deployment_app, Application)


def test_an_omitted_k_is_the_default_cut_to_a_small_database():
    assert serving.parse_k(None, 5) == serving.parse_k("", 5) == 5
    assert serving.parse_k(None, 1000) == serving.DEFAULT_K
    assert serving.parse_k("3", 5) == 3
    with pytest.raises(serving.RequestError, match=r"k: must be in 1\.\.5 .*got 10") as e:
        serving.parse_k("10", 5)  # asked for: refused, as before
    assert e.value.status == 422


def test_gray_is_decided_by_the_pixels_not_the_mode():
    gen = np.random.default_rng(6)
    x = gen.integers(0, 256, (8, 8), dtype=np.uint8)

    def blob(img: Image.Image, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt)
        return buf.getvalue()

    gray, rgb = Image.fromarray(x), Image.fromarray(x).convert("RGB")
    colour = Image.fromarray(np.stack([x, x // 2, 255 - x], -1))
    gray_ones = {"gif": blob(gray, "GIF"), "gray palette": blob(gray.convert("P")),
                 "gray as RGB": blob(rgb),
                 "gray as RGB palette": blob(rgb.convert("P", palette=Image.Palette.ADAPTIVE))}
    gray_model = SimpleNamespace(channels=1, image_size=8)
    for what, data in gray_ones.items():
        assert Image.open(io.BytesIO(data)).mode in ("P", "RGB"), what
        np.testing.assert_array_equal(serving.decode_image(data, what, gray_model, False)[0], x,
                                      err_msg=what)
    for data in (blob(colour), blob(colour.convert("P", palette=Image.Palette.ADAPTIVE))):
        with pytest.raises(serving.RequestError, match="a colour image, the model takes gray"):
            serving.decode_image(data, "c", gray_model, False)
    # a colour model takes RGB and palette files whatever their pixels, and refuses gray files
    colour_model = SimpleNamespace(channels=3, image_size=8)
    for data in (blob(colour), gray_ones["gray as RGB"], gray_ones["gif"]):
        assert serving.decode_image(data, "c", colour_model, False).shape == (3, 8, 8)
    with pytest.raises(serving.RequestError, match="a gray image, the model takes colour"):
        serving.decode_image(blob(gray), "g", colour_model, False)
    # 16 bits: value / 257, as encode decodes it
    deep = blob(Image.fromarray(x.astype(np.uint16) * 257))
    np.testing.assert_array_equal(serving.decode_image(deep, "d", gray_model, False)[0], x)
    # float 0..1 (a float TIFF): times 255, not clipped black
    unit = blob(Image.fromarray(x / np.float32(255)), "TIFF")
    np.testing.assert_array_equal(serving.decode_image(unit, "f", gray_model, False)[0], x)


def test_a_device_this_machine_lacks_is_refused_before_anything_starts(monkeypatch, capsys):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def started(*args, **kwargs):
        raise AssertionError("the device was checked after the model loaded")

    monkeypatch.setattr(serving, "_build", started)
    assert serving.main(["--checkpoint", "no_run", "--device", f"cuda:{n}"]) == 2
    line = capsys.readouterr().err.strip()
    # the line jobs/encode.py prints for the same device
    assert cli.encode_main(["--checkpoint", "no_run", "--split", "query", "--out", "x.parquet",
                            "--device", f"cuda:{n}"]) == 2
    assert line == capsys.readouterr().err.strip() == (
        f"error: --device: 'cuda:{n}': this machine has {n} CUDA device(s)")


def test_a_cluster_without_the_gpus_asked_for_is_refused_not_waited_for(monkeypatch, capsys):
    """RAY_ADDRESS names a cluster (the device is its machines', not this one's) that has no GPU:
    one line and exit 2 once connected, before Serve starts (Ray's calls stubbed: no cluster)."""
    import ray
    from ray import serve

    calls = []
    monkeypatch.setenv("RAY_ADDRESS", "ray://nowhere:10001")
    monkeypatch.setattr(serving, "_build", lambda options: (None, "summary"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: calls.append("shutdown"))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(serve, "start", lambda *a, **k: calls.append("serve"))
    assert serving.main(["--checkpoint", "x", "--device", "cuda", "--replicas", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --device: 2 replica(s) on cuda need 2 GPU(s), the Ray cluster has 0")
    assert calls == ["init", "shutdown"]


def test_the_serve_run_builder_checks_the_device_as_jobs_serve_does(monkeypatch):
    """`serve run dadh_dist.serve:app` builds without jobs/serve.py: the same refusals, before
    the model loads (Ray's and torch's answers stubbed: no cluster, no GPU needed)."""
    import ray

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(serving, "load_model", loaded)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the module's service may run
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(config.ConfigError) as e:
        serving.app({"checkpoint": "no_run", "device": f"cuda:{n}"})
    assert str(e.value) == f"--device: 'cuda:{n}': this machine has {n} CUDA device(s)"
    # one GPU here: one replica on it passes, two would wait for a second forever
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(config.ConfigError, match=r"^--device: 2 replica\(s\) on cuda need 2 "
                       r"GPU\(s\), this machine has 1$"):
        serving.app({"checkpoint": "no_run", "device": "cuda", "replicas": "2"})
    with pytest.raises(AssertionError, match="the model loaded"):
        serving.app({"checkpoint": "no_run", "device": "cuda"})
    # Ray starts here with this machine's CPUs: replicas asking for more would never start
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(config.ConfigError, match=r"^--replicas: 3 x 1.0 CPU need 3 CPUs, this "
                       r"machine has 2 \(lower --cpus-per-replica\)$"):
        serving.app({"checkpoint": "no_run", "replicas": "3", "cpus_per_replica": "1"})
    # a named cluster is asked (and left again), as jobs/serve.py asks it once connected
    calls = []
    monkeypatch.setenv("RAY_ADDRESS", "ray://nowhere:10001")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: calls.append("shutdown"))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(config.ConfigError, match=r"2 GPU\(s\), the Ray cluster has 0$"):
        serving.app({"checkpoint": "no_run", "device": "cuda", "replicas": "2"})
    assert calls == ["init", "shutdown"]
    # Serve's controller building a config file's application: connected already
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(config.ConfigError, match=r"2 GPU\(s\), the Ray cluster has 1$"):
        serving.app({"checkpoint": "no_run", "device": "cuda:1", "replicas": "2"})
    assert calls == ["init", "shutdown"]


def test_serve_run_refuses_a_missing_device_in_one_line(monkeypatch):
    """Ray Serve's own `serve run` command, in this process: the line jobs/serve.py prints and
    exit 2, not a traceback, before serve run starts Ray."""
    import ray
    from click.testing import CliRunner
    from ray.serve.scripts import cli as serve_cli

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # serve run puts its --app-dir first
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result = CliRunner().invoke(serve_cli, ["run", "dadh_dist.serve:app", "checkpoint=no_run",
                                            f"device=cuda:{n}"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: --device: 'cuda:{n}': this machine has {n} CUDA " \
        "device(s)"


def test_only_cuda_devices_ask_ray_for_a_gpu(run):
    assert [serving.replica_gpus(d) for d in ("cpu", "cpu:0", "cuda", "cuda:3")] == [0, 0, 1, 1]
    application, _ = serving._build(serving.Options(checkpoint=str(run), device="cpu:0"))
    assert application._bound_deployment.ray_actor_options["num_gpus"] == 0
    with pytest.raises(config.ConfigError, match="'tpu' is not a torch device"):
        serving.replica_gpus("tpu")


def test_faiss_index_takes_ties_in_database_order_as_the_packed_kernel(monkeypatch):
    pytest.importorskip("faiss")
    gen = np.random.default_rng(3)
    codes = np.where(gen.random((3000, 16)) < 0.5, -1, 1).astype(np.int8)
    codes[1000:2000] = codes[0]  # a thousand-way tie
    database = codesfile.Codes.from_pm1(np.arange(3000) * 7, codes, encoder="B",
                                        model_sha256="0" * 64)
    q = database.packed[::97]
    want = codesfile.topk(q, database.packed, 40, 16, "packed")
    monkeypatch.setattr(serving, "_RANGE_ROWS", 7000)  # range searches of two queries at a time
    for backend in ("faiss", "packed"):
        index = serving.Index(database, backend)
        assert index.backend == backend
        for k in (1, 40):
            got = index.topk(q, k)
            np.testing.assert_array_equal(got[0], want[0][:, :k])
            np.testing.assert_array_equal(got[1], want[1][:, :k])
    assert serving.Index(database, "auto").backend == "faiss"
    odd = codesfile.Codes.from_pm1(np.arange(5), codes[:5, :12], encoder="B",
                                   model_sha256="0" * 64)
    assert serving.Index(odd, "auto").backend == "packed"
    with pytest.raises(config.ConfigError, match="multiple of 8"):
        serving.Index(odd, "faiss")


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ requests, without a server


@pytest.fixture(scope="module")
def plain(run) -> serving.Service:
    """A Service of the run without Ray or HTTP (4 images a request), for `handle`."""
    options = serving.Options(checkpoint=str(run), max_images=4, backend="packed")
    model = serving.load_model(run)
    return serving.Service(options, serving.load_database(options, model), model)


def _json(service: serving.Service, doc, path: str = "/search", params=None):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return service.handle("POST", path, body, "application/json", params)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_json_python_cannot_read_is_a_400_not_a_500(plain, queries):
    image = _b64(next(iter(queries.values())))
    huge_k = f'{{"images": ["{image}"], "k": {"9" * 5000}}}'.encode()  # past int's 4300 digits
    for body in (huge_k, b"[" * 100_000):  # 100 kB of nesting: past the recursion limit
        status, doc = _json(plain, body)
        assert status == 400 and doc["error"].startswith("body: not JSON ("), doc


def test_ids_are_strings_or_integers_an_answer_can_carry(plain, queries):
    """ids come back in the answer, which Starlette renders as strict UTF-8 JSON: a NaN or a
    lone surrogate would fail there, after the search, as a 500."""
    from starlette.responses import JSONResponse

    images = [_b64(b) for b in list(queries.values())[:2]]
    for ids, needle in (([float("nan"), 1], "ids[0]: expected a string or an integer, got NaN"),
                        ([1, {"a": 1}], 'ids[1]: expected a string or an integer, got {"a": 1}'),
                        ([True, 1], "ids[0]: expected a string or an integer, got true"),
                        (["a", "\ud800"], "ids[1]: not Unicode text")):
        status, doc = _json(plain, {"images": images, "ids": ids, "k": 1})
        assert (status, doc["error"][:len(needle)]) == (400, needle), doc
    status, doc = _json(plain, {"images": images, "ids": ["café", 7], "k": 1})
    assert status == 200 and [r["query"] for r in doc["results"]] == ["café", 7]
    JSONResponse(doc)  # renders


def test_data_urls_are_base64_images(plain, queries):
    image = _b64(next(iter(queries.values())))
    for url in (f"data:image/png;base64,{image}", f"data:;base64,{image}",
                f"data:application/octet-stream;BASE64,{image}"):
        assert _json(plain, {"images": [url]}, "/encode")[0] == 200, url
    for url, status, needle in (
            (f"data:text/plain;base64,{image}", 422, "a data: URL of 'text/plain', not of an"),
            (f"data:image/png,{image}", 400, "a data: URL that is not base64"),  # %-encoded
            ("data:image/png;base64", 400, "a data: URL that is not base64")):
        got = _json(plain, {"images": [url]}, "/encode")
        assert got[0] == status and got[1]["error"].startswith(f"images[0]: {needle}"), got


def test_k_is_given_once_and_no_other_parameter(plain, queries):
    """A request that names k twice (or a parameter the service does not know, like ?K=5) is
    refused, not answered with one of the values or with the default k."""
    raw = next(iter(queries.values()))
    doc = {"images": [_b64(raw)], "k": 3}
    cases = [  # (what, status, message start, the request)
        ("k twice in the query", 400, "k: given 2 times in the query (1, 2)",
         lambda: plain.handle("POST", "/search", raw, "image/png", {"k": ["1", "2"]})),
        ("k in the body and the query", 400, "k: given in the body and in the query; give it once",
         lambda: _json(plain, doc, params={"k": "3"})),
        ("an unknown parameter", 400, "query parameter 'K': unknown (known: k)",
         lambda: plain.handle("POST", "/search", raw, "image/png", {"K": ["5"]})),
        ("on /encode too", 400, "query parameter 'kk': unknown",
         lambda: _json(plain, doc, "/encode", {"kk": "5"})),
    ]
    for what, status, needle, send in cases:
        got = send()
        assert got[0] == status and got[1]["error"].startswith(needle), (what, got)
    for params in ({"k": ["4"]}, {"k": "4"}):
        status, got = plain.handle("POST", "/search", raw, "image/png", params)
        assert status == 200 and len(got["results"][0]["ids"]) == 4, got


def test_multipart_parts_are_counted_before_they_are_parsed(plain, queries, monkeypatch):
    """Python's email parser takes about 15 s for 16 MiB of tiny parts (the default body limit):
    a request of more parts than images and k is refused unparsed."""
    image = next(iter(queries.values()))

    def body(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, str]:
        out = b"".join(b"--XX\r\nContent-Disposition: form-data" + (
            f'; name="{name}"'.encode() if name else b"") + (
            f'; filename="{filename}"'.encode() if filename else b"") + b"\r\n\r\n" + data +
            b"\r\n" for name, filename, data in parts)
        return out + b"--XX--\r\n", "multipart/form-data; boundary=XX"

    parsed = []

    class Parser(serving.BytesParser):
        def parsebytes(self, text, headersonly=False):
            parsed.append(headersonly)
            return super().parsebytes(text, headersonly)

    monkeypatch.setattr(serving, "BytesParser", Parser)
    many = body(*[("image", "a.png", b"x")] * 1000)
    status, doc = plain.handle("POST", "/search", *many)
    assert (status, doc["error"]) == (413, "too many parts: 1000 in one multipart request, the "
                                           "limit is 4 images (--max-images) and k")
    assert False not in parsed  # only the header was parsed
    # 4 images and k pass the count; 5 images pass it to the images' own refusal
    k_part = ("k", None, b"2")
    status, doc = plain.handle("POST", "/search", *body(*[("image", "a.png", image)] * 4, k_part))
    assert status == 200 and doc["k"] == 2, doc
    status, doc = plain.handle("POST", "/search", *body(*[("image", "a.png", image)] * 5))
    assert status == 413 and doc["error"].startswith("too many images: 5 in one request"), doc
    # a part without a name, and k twice
    for parts, needle in (([(None, None, image)], "multipart part 1: no name (send files as"),
                          ([("image", "a.png", image), k_part, k_part],
                           "k: given twice in the multipart body")):
        status, doc = plain.handle("POST", "/search", *body(*parts))
        assert status == 400 and doc["error"].startswith(needle), doc


def test_an_image_of_another_size_is_refused_from_its_header(monkeypatch):
    """A colour file for a gray model has its pixels read to see whether they are gray, which
    takes half a second for a 6000 x 6000 PNG of 100 kB: only done at the model's size."""
    def read(img):
        raise AssertionError(f"the pixels of a {img.size} image were read")

    monkeypatch.setattr(inference, "pixels_are_gray", read)
    gray_model = SimpleNamespace(channels=1, image_size=8)
    with pytest.raises(serving.RequestError, match="image big: 600x600 px, the model takes 8x8"):
        serving.decode_image(_png(np.zeros((600, 600, 3), np.uint8)), "big", gray_model, False)


def _asgi_request(method: str, path: str, body: bytes = b"", content_type: str = "",
                  query: str = ""):
    """A Starlette request as Serve's proxy hands a replica one."""
    from starlette.requests import Request

    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    headers = [(b"content-length", str(len(body)).encode())]
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    return Request({"type": "http", "method": method, "path": path, "headers": headers,
                    "query_string": query.encode()}, receive)


def test_a_replica_answers_head_repeated_parameters_and_decodes_off_its_loop(plain, queries,
                                                                             monkeypatch):
    """`Retrieval.__call__` without Serve (its batch: the one request): HEAD where GET is, a
    405 with its Allow header, ?k=1&k=2 refused, and the request decoded in a thread, not on
    the replica's event loop, which its other requests and its batches share."""
    import asyncio
    import threading

    replica = object.__new__(serving.Retrieval)
    replica.service = plain

    async def encode_batch(work):
        return plain.run_batch([work])[0], len(work.images)

    replica.encode_batch = encode_batch
    threads = []
    parse = plain.parse

    def parse_recorded(*args):
        threads.append(threading.current_thread())
        return parse(*args)

    monkeypatch.setattr(plain, "parse", parse_recorded)
    image = next(iter(queries.values()))

    async def send(*args):
        resp = await replica(_asgi_request(*args))
        return resp.status_code, json.loads(resp.body), resp.headers.get("allow")

    def answer(*args):
        return asyncio.run(send(*args))

    assert answer("HEAD", "/healthz") == (200, {"status": "ok"}, None)
    assert answer("HEAD", "/info")[:2] == (200, plain.info())
    assert answer("GET", "/search") == (405, {"error": "GET /search: use POST"}, "POST")
    assert answer("HEAD", "/encode")[2] == "POST"
    assert answer("POST", "/info") == (405, {"error": "POST /info: use GET"}, "GET, HEAD")
    status, doc, _ = answer("POST", "/search", image, "image/png", "k=1&k=2")
    assert (status, doc["error"]) == (400, "k: given 2 times in the query (1, 2)")
    status, doc, _ = answer("POST", "/search", image, "image/png", "k=2")
    assert status == 200 and len(doc["results"][0]["ids"]) == 2
    assert threads and threading.main_thread() not in threads


def test_only_the_served_formats_are_read(monkeypatch):
    """PIL reads dozens of formats, EPS through Ghostscript: a request's image may use only
    FORMATS, whatever PIL has installed."""
    from PIL import Image

    model = SimpleNamespace(channels=1, image_size=8)
    for kind in ("EPS", "PCX", "ICO"):  # readable by PIL, not served
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, kind)
        with pytest.raises(serving.RequestError, match="not an image of a format served here"):
            serving.decode_image(buf.getvalue(), "x", model, False)
    for kind in serving.FORMATS:  # each one comes through
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), 7, np.uint8)).save(buf, kind)
        assert serving.decode_image(buf.getvalue(), kind, model, False).shape == (1, 8, 8)
