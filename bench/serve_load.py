"""Load test of the retrieval service (dadh_dist.serve, issue 21) on loopback.

    python bench/serve_load.py [--checkpoint runs/<run>] [--requests 2000] [--clients 16]
    python bench/serve_load.py --quick          # a smoke run: 200 requests, 4 clients

Without --checkpoint the debug run (configs/debug_cpu.toml; one short outer iteration with
--quick) is trained into a temporary folder first. The queries are images of the run's query
and validation splits as PNG files, one image per request, reused in turn (request i sends
image i % pool).

Measured, on the same requests:

* the service: Ray on 127.0.0.1, Serve with --replicas replicas, the run's learned B as the
  database; first 1 client in sequence (latency without queueing), then --clients concurrent
  clients (aiohttp, keep-alive). requests/s, p50/p99 latency, errors (anything but 200), and
  mismatches: answers whose ids or distances differ from the baseline's for that image.
* the baseline, the command line: jobs/search.py over a folder holding every request's image
  (one process: model load, decoding, encoding and search of all of them), and jobs/search.py
  with one image per invocation (what answering one request from the command line costs).

Exit status 1 when a request failed or an answer differs from the command line's. No target:
the ratios are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _env
import numpy as np
from _common import exit_status, free_port, table

REPO = Path(__file__).resolve().parents[1]



def train_debug_run(folder: Path, quick: bool) -> Path:
    """configs/debug_cpu.toml as it is (codes that learned: ties as a trained model has them),
    or one short outer iteration with --quick."""
    from dadh_dist import config
    from dadh_dist import run as runner

    short = ["train.outer_iters=1", "train.inner_epochs=1", "train.num_samples=256"]
    cfg = config.load(REPO / "configs" / "debug_cpu.toml", [
        "scaling.use_ray=false", f"log.run_dir={json.dumps(str(folder))}", "log.name=serve_load",
        "log.tensorboard=false", *(short if quick else [])])
    return Path(runner.run_local(cfg)["run_dir"])


def query_pool(run: Path) -> list[bytes]:
    """PNG bytes of the run's query and validation images."""
    import io

    from PIL import Image

    from dadh_dist import inference

    hf, ds = inference.load_with_data(run)
    images = np.concatenate([ds.query.images, ds.validation.images])
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[0] if hf.channels == 1 else img.transpose(1, 2, 0)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def cli_search(run: Path, database: Path, query: Path, k: int) -> tuple[float, dict]:
    """(wall seconds, name -> (ids, distances)) of one jobs/search.py process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "search.py"), "--database",
                           str(database), "--query", str(query), "--checkpoint", str(run), "-k",
                           str(k), "--json", "--quiet"], capture_output=True, text=True,
                          check=True)
    seconds = time.perf_counter() - t0
    results = json.loads(proc.stdout)["results"]
    return seconds, {r["query"]: (r["ids"], r["distances"]) for r in results}


async def load(url: str, names: list[str], blobs: list[bytes], k: int, clients: int,
               want: dict) -> dict:
    """Send request i = 0..len(names)-1 from `clients` concurrent clients; latencies and
    outcomes."""
    import aiohttp

    from dadh_dist import serve as serving

    latencies = np.zeros(len(names))
    errors, mismatches, batch_images = 0, 0, []
    counter = iter(range(len(names)))
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client() -> None:
            nonlocal errors, mismatches
            for i in counter:
                form = aiohttp.FormData()
                form.add_field("image", blobs[i], filename=names[i], content_type="image/png")
                t0 = time.perf_counter()
                async with session.post(f"{url}/search?k={k}", data=form) as resp:
                    body = await resp.read()
                    status = resp.status
                    batch_images.append(int(resp.headers.get(serving.BATCH_HEADER, 0)))
                latencies[i] = time.perf_counter() - t0
                if status != 200:
                    errors += 1
                    continue
                r = json.loads(body)["results"][0]
                if (r["ids"], r["distances"]) != want[names[i]]:
                    mismatches += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"wall": wall, "latencies": latencies, "errors": errors, "mismatches": mismatches,
            "batch": float(np.mean(batch_images))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="run or checkpoint folder (default: train a short "
                        "debug run into a temporary folder)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sequential", type=int, default=200,
                        help="requests of the one-client pass")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray")
    parser.add_argument("-k", "--k", type=int, default=10)
    parser.add_argument("--cli-single", type=int, default=5,
                        help="jobs/search.py invocations with one image each")
    parser.add_argument("--quick", action="store_true",
                        help="200 requests, 4 clients, 50 sequential, 2 single invocations")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.clients, args.sequential, args.cli_single = 200, 4, 50, 2
    load0 = _env.load_average()

    import ray
    from ray import serve

    from dadh_dist import cli
    from dadh_dist import serve as serving
    from dadh_dist.run.session import loopback_only

    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        tmp = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):  # training's lines; stdout is the table
            run = (Path(args.checkpoint) if args.checkpoint
                   else train_debug_run(tmp / "runs", args.quick))
        pool = query_pool(run)
        names = [f"r{i:05d}.png" for i in range(args.requests)]
        blobs = [pool[i % len(pool)] for i in range(args.requests)]
        folder = tmp / "requests"
        folder.mkdir()
        for name, blob in zip(names, blobs):
            (folder / name).write_bytes(blob)
        database = tmp / "db.parquet"
        with contextlib.redirect_stdout(sys.stderr):
            encoded = cli.encode_main(["--checkpoint", str(run), "--split", "database",
                                       "--learned", "--out", str(database), "--quiet"])
        if encoded != 0:
            raise SystemExit(f"jobs/encode.py of the database failed (exit {encoded})")

        cli_all_s, want = cli_search(run, database, folder, args.k)
        single = []
        for i in range(args.cli_single):
            one = tmp / f"single_{i}"
            one.mkdir()
            (one / names[i]).write_bytes(blobs[i])
            single.append(cli_search(run, database, one, args.k)[0])

        port = free_port()
        options = serving.Options(checkpoint=str(run), port=port, replicas=args.replicas)
        loopback_only()
        ray.init(num_cpus=args.cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(serving.build(options), name=serving.APP_NAME, route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            info = json.loads(_get(f"{url}/info"))
            warm = min(20, args.requests)
            asyncio.run(load(url, names[:warm], blobs[:warm], args.k, 1, want))
            seq_n = min(args.sequential, args.requests)
            seq = asyncio.run(load(url, names[:seq_n], blobs[:seq_n], args.k, 1, want))
            par = asyncio.run(load(url, names, blobs, args.k, args.clients, want))
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()

    def row(what, n, clients, wall, lat, errors, mismatches, batch):
        return [what, n, clients, n / wall, 1e3 * np.percentile(lat, 50),
                1e3 * np.percentile(lat, 99), errors, mismatches, batch]

    headers = ["", "requests", "clients", "requests/s", "p50 ms", "p99 ms", "errors",
               "mismatches", "images / forward pass"]
    rows = [
        row("service, 1 client", seq_n, 1, seq["wall"], seq["latencies"], seq["errors"],
            seq["mismatches"], seq["batch"]),
        row(f"service, {args.clients} clients", args.requests, args.clients, par["wall"],
            par["latencies"], par["errors"], par["mismatches"], par["batch"]),
        row("jobs/search.py, all requests in one process", args.requests, 1, cli_all_s,
            np.array([cli_all_s]), 0, 0, "–"),
        row("jobs/search.py, one image per process", len(single), 1, sum(single),
            np.array(single), 0, 0, 1),
    ]
    print(f"# Retrieval service load test: {args.requests} requests of one {info['input']['size']}"
          f"x{info['input']['size']} image, top-{args.k} of {info['database_size']} "
          f"{info['bits']}-bit codes ({info['backend']}), {args.replicas} replica(s)\n")
    print(table(headers, rows))
    print()
    print(f"- service vs jobs/search.py in one process: "
          f"{args.requests / par['wall'] / (args.requests / cli_all_s):.2f}x the requests/s; "
          f"p50 latency {1e3 * np.percentile(par['latencies'], 50):.1f} ms vs "
          f"{1e3 * np.median(single):.0f} ms for one jobs/search.py invocation")
    print("- latency: from sending the request to reading the whole answer, client side; the "
          "clients run on the same cores as the service")
    print("- the one-process baseline's p50/p99 is its whole wall time (one answer for all)")
    print(f"- finished {time.strftime('%Y-%m-%d %H:%M:%S')}")
    _env.print_environment(load0)
    passes = (("1 client", seq), (f"{args.clients} clients", par))
    checks = [(f"{what}: every request answered ({r['errors']} errors)", r["errors"] == 0)
              for what, r in passes]
    checks += [(f"{what}: answers = jobs/search.py's ({r['mismatches']} mismatches)",
                r["mismatches"] == 0) for what, r in passes]
    sys.exit(exit_status(checks))

def _get(url: str) -> bytes:
    from urllib.request import urlopen

    with urlopen(url, timeout=30) as resp:
        return resp.read()


if __name__ == "__main__":
    main()
