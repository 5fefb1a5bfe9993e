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
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
        ("colour for a gray model", 422, "colour image",
         lambda: _post(f"{service}/search", data=_png(np.zeros((8, 8, 3), np.uint8)),
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
    ]
    for what, status, needle, send in cases:
        resp = send()
        assert resp.status_code == status, (what, resp.status_code, resp.text)
        error = resp.json()["error"]
        assert needle in error and "\n" not in error and "Traceback" not in error, (what, error)
    # the service still answers after all of them
    assert _post(f"{service}/encode", data=image, headers=png).status_code == 200


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


def test_an_export_serves_the_checkpoints_codes_and_database(run, queries, tmp_path):
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
