"""`jobs/train.py` as a user runs it, in one process (scaling.use_ray=false): what it prints and
what final_metrics.json holds."""

from __future__ import annotations

import json
import time
import tomllib

from _pty import stderr_on_terminal
from _repo import DEBUG, job, job_args, job_env


def test_train_script_prints_its_run_folder_and_writes_final_metrics(tmp_path):
    start = time.time()
    proc = job("train", "--config", DEBUG, "scaling.use_ray=false",
               f"log.run_dir={json.dumps(str(tmp_path))}", "--name", "cli", "objective.bits=12",
               "--batch-size", "16")
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "cli"
    lines = proc.stdout.splitlines()
    assert f"run folder: {run}" in lines
    T = tomllib.loads(DEBUG.read_text())["train"]["outer_iters"]
    progress = [line.split("] ", 1)[1] for line in lines if "] iter " in line]
    # one line per outer iteration
    assert [line.split()[1] for line in progress] == [f"{t}/{T}" for t in range(1, T + 1)]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["bits"] == 12 and final["outer_iters"] == T and final["workers"] == 1
    assert 0 < final["wall_s"] < elapsed
    assert final["database"] + final["queries"] + 100 == 1797  # digits: 100 validation images
    shown = dict(item.split("=") for item in lines[-1].removeprefix("final metrics: ").split(", "))
    assert float(shown["map_all_fg"]) == round(final["map_all_fg"], 4)
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["objective"]["bits"] == 12 and saved["scaling"]["use_ray"] is False
    # --name and --batch-size are log.name and train.batch_size
    assert saved["log"]["name"] == "cli" and saved["train"]["batch_size"] == 16


def test_training_shows_per_batch_progress_on_a_terminal_only(tmp_path):
    args = ["--config", DEBUG, "scaling.use_ray=false", f"log.run_dir={json.dumps(str(tmp_path))}",
            "train.outer_iters=1", "log.tensorboard=false"]
    proc, shown = stderr_on_terminal(job_args("train", *args, "--name", "tty"), timeout=300,
                                     env=job_env())
    assert proc.returncode == 0, shown
    cfg = tomllib.loads(DEBUG.read_text())["train"]
    total = cfg["inner_epochs"] * -(-cfg["num_samples"] // cfg["batch_size"])
    assert "iter 1: " in shown and f"/{total}" in shown and "batch/s" in shown, shown[-2000:]
    assert "\r" in shown  # rewritten in place
    piped = job("train", *args, "--name", "pipe")
    assert piped.returncode == 0 and "batch/s" not in piped.stderr + piped.stdout
    # --quiet: no bar on a terminal either; the line per outer iteration stays
    quiet, shown = stderr_on_terminal(
        job_args("train", *args, "train.num_samples=64", "--name", "quiet", "--quiet"),
        timeout=300, env=job_env())
    assert quiet.returncode == 0, shown
    assert "batch/s" not in shown and "iter 1/1" in quiet.stdout + shown


def test_training_a_run_another_process_trains_and_an_unwritable_run_dir_are_one_line(
        tmp_path, capsys):
    """`train` twice with one run name (two terminals): the second says so in one line, exit 2,
    and writes nothing; a run folder that cannot be made is one line too (was a traceback)."""
    import fcntl

    from dadh_dist import cli

    def train(run_dir, *extra) -> tuple[int, str]:
        code = cli.train_main(["--config", str(DEBUG), "scaling.use_ray=false", "--name", "r",
                               f"log.run_dir={json.dumps(str(run_dir))}", *extra])
        return code, capsys.readouterr().err

    (tmp_path / "r").mkdir()
    with open(tmp_path / "r" / ".run.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = train(tmp_path, "objective.gamma=5")
    assert code == 2 and err == (f"error: log.name: run 'r' in {tmp_path / 'r'} is being trained "
                                 "by another process on this machine; wait for it to end or "
                                 "stop it, or use another log.name\n")
    assert [p.name for p in (tmp_path / "r").iterdir()] == [".run.lock"]
    (tmp_path / "file").write_text("")
    code, err = train(tmp_path / "file")
    assert code == 2 and err == (f"error: log.run_dir: cannot write the run folder "
                                 f"{tmp_path / 'file' / 'r'} (Not a directory)\n")
