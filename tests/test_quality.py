"""The quality-table tool: method overrides, table arithmetic, reuse of finished runs."""

from __future__ import annotations

import json
import shlex

import pytest
from _repo import DEBUG as DEBUG_CONFIG

from dadh_dist import cli, config, quality

DEBUG = str(DEBUG_CONFIG)


def test_every_method_is_a_valid_configuration_of_the_same_code(tmp_path):
    plan = quality.Plan(DEBUG, tmp_path)
    for method in quality.METHODS:
        cmd = plan.command(quality.Cell(method, 12, 1))
        assert cmd[:6] == ["python", "-m", "dadh_dist", "train", "--config", DEBUG]
        assert cmd[6:] == plan.cell_overrides(quality.Cell(method, 12, 1))
        cfg = config.load(plan.config_path(quality.Cell(method, 12, 1)), cmd[6:])
        # the debug config says 16 bits: the cell's code length wins
        assert cfg.train.seed == 1 and not cfg.scaling.use_ray and cfg.objective.bits == 12
        o = cfg.objective
        assert (o.two_streams, o.use_pair, o.use_code) == {
            "dadh": (True, True, True),
            "adsh": (False, False, True),
            "dadh-no-code": (True, True, False),
            "dadh-no-pair": (True, False, True),
        }[method]
    with pytest.raises(ValueError, match="unknown-method"):
        plan.command(quality.Cell("unknown-method", 16, 0))


def test_threads_reach_the_trainer_as_its_cpus_per_worker(tmp_path):
    """--threads is the run's torch thread count: the in-process trainer sets it from
    scaling.cpus_per_worker, so an environment variable alone would not hold it (the trainer
    would use the config's 2); an explicit override of the key wins."""
    from dadh_dist.run.local import worker_threads

    cell = quality.Cell("adsh", 16, 0)
    for overrides, want in (([], 3), (["scaling.cpus_per_worker=2"], 2)):
        plan = quality.Plan(DEBUG, tmp_path, overrides, threads=3)
        assert worker_threads(config.load(DEBUG, plan.cell_overrides(cell))) == want
    assert worker_threads(config.load(DEBUG, quality.Plan(DEBUG, tmp_path).cell_overrides(
        cell))) == config.load(DEBUG).scaling.cpus_per_worker


def _row(method, bits, seed, **m):
    return {"method": method, "bits": bits, "seed": seed, "metrics": {"wall_s": 10.0, **m}}


def test_table_means_and_sample_spreads_by_hand():
    rows = [
        _row("dadh", 32, 0, map_all_f=0.80, map_all_g=0.70, map_all_fg=0.90, p_at_1000_f=0.5),
        _row("dadh", 32, 1, map_all_f=0.90, map_all_g=0.70, map_all_fg=0.70, p_at_1000_f=0.7),
        _row("adsh", 32, 0, map_all_f=0.75, p_at_1000_f=0.6),
        _row("adsh", 12, 0, map_all_f=0.50, p_at_1000_f=0.4),
        {"method": "dadh", "bits": 12, "seed": 0, "error": "exit 2: bad"},
    ]
    lines = quality.table(rows).strip().splitlines()
    assert lines[0].startswith("| method | bits | seeds | map_all f |")
    # sorted by bits, then method order; mean ± sample std (n-1): 0.85 ± 0.0707
    assert lines[2] == "| adsh | 12 | 1 | 0.500 | — | — | 0.400 (f) | 10 |"
    assert lines[3] == ("| dadh | 32 | 2 | 0.850 ± 0.071 | 0.700 ± 0.000 | 0.800 ± 0.141 "
                        "| 0.600 ± 0.141 (f) | 10 |")
    assert lines[4] == "| adsh | 32 | 1 | 0.750 | — | — | 0.600 (f) | 10 |"
    assert len(lines) == 5  # the failed cell is not in the table


def test_topk_protocols_report_map_at_k():
    rows = [_row("dadh", 32, 0, map_all_f=0.1, map_at_1000_f=0.9, map_at_1000_g=0.8,
                 map_at_1000_fg=0.85, p_at_1000_f=0.5)]
    text = quality.table(rows)
    assert "map_at_1000 f" in text and "| 0.900 | 0.800 | 0.850 | 0.500 (f) |" in text


def _finish(plan: quality.Plan, cell: quality.Cell, **metrics) -> None:
    """Leave the cell as a finished run leaves it: its final metrics and the config it ran."""
    done = quality.metrics_path(plan, cell)
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"wall_s": 1.0, **metrics}))
    planned = config.load(plan.config_path(cell), plan.cell_overrides(cell))
    (done.parent / "config.toml").write_text(planned.to_toml())


def test_finished_cells_are_read_back_not_rerun(tmp_path):
    cell = quality.Cell("adsh", 16, 0)
    plan = quality.Plan(DEBUG, tmp_path)
    _finish(plan, cell, map_all_f=0.5)
    row = quality.run_cell(plan, cell)
    assert row["metrics"]["map_all_f"] == 0.5 and "process_wall_s" not in row
    # the same cell asked for with another budget: an error, never the old numbers
    longer = quality.Plan(DEBUG, tmp_path, overrides=["train.outer_iters=7"])
    row = quality.run_cell(longer, cell)
    assert "metrics" not in row and "another config (train.outer_iters: 4 -> 7)" in row["error"]
    missing = quality.run_cell(plan, quality.Cell("dadh", 16, 0), train=False)
    assert missing["error"] == "not run yet"
    assert not (tmp_path / "dadh_16b_s0").exists()  # nothing was trained


def test_quality_main_runs_a_real_cell_and_rejects_bad_arguments(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["--config", DEBUG, "--methods", "adsh", "--bits", "16", "--out", str(out),
            "--threads", "1", "train.outer_iters=1", "eval.topk=50"]
    assert cli.quality_main(argv) == 0
    text = capsys.readouterr().out
    assert "| adsh | 16 | 1 |" in text and "map_at_50 f" in text
    rows = json.loads((out / "rows.json").read_text())
    assert rows[0]["command"].startswith("python -m dadh_dist train --config")
    assert "scaling.cpus_per_worker=1" in rows[0]["command"]
    assert config.load(out / "adsh_16b_s0" / "config.toml").scaling.cpus_per_worker == 1
    assert 0.0 <= rows[0]["metrics"]["map_at_50_f"] <= 1.0
    assert cli.quality_main(["--methods", "nope"]) == cli.EXIT_USER_ERROR
    assert cli.quality_main(["--config", DEBUG, "--threads", "-1"]) == cli.EXIT_USER_ERROR
    assert cli.quality_main(["--config", DEBUG, "--method-override", "adsh=1"]) == \
        cli.EXIT_USER_ERROR
    assert cli.quality_main(["--config", DEBUG, "--bits", "16", "objective.gama=3"]) == \
        cli.EXIT_USER_ERROR
    assert "objective.gama" in capsys.readouterr().err


def test_table_only_json_and_quiet_on_finished_cells(tmp_path, capsys):
    plan = quality.Plan(DEBUG, tmp_path, threads=1)
    _finish(plan, quality.Cell("adsh", 16, 0), map_all_f=0.5, p_at_1000_f=0.25)
    argv = ["--config", DEBUG, "--methods", "adsh,dadh", "--bits", "16", "--out", str(tmp_path),
            "--threads", "1", "--table-only"]
    assert cli.quality_main([*argv, "--json"]) == 0  # a cell not run yet is no failure here
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert (payload["out"], payload["table"]) == (str(tmp_path), None)  # --table-only writes none
    adsh, dadh = payload["rows"]
    assert (adsh["method"], adsh["metrics"]["map_all_f"]) == ("adsh", 0.5)
    assert adsh["command"] == shlex.join(plan.command(quality.Cell("adsh", 16, 0)))
    assert (dadh["method"], dadh["error"]) == ("dadh", "not run yet")
    assert "| adsh | 16 | 1 | 0.500 | — | — | 0.250 (f) | 1 |" in payload["markdown"]
    # the line per cell went to stderr
    assert captured.err.splitlines() == ["adsh_16b_s0: map_all_f=0.5000, wall 1s",
                                         "dadh_16b_s0: not run yet"]
    assert cli.quality_main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == payload["markdown"] and captured.err == ""
    assert not (tmp_path / "table.md").exists()


def test_failed_cells_are_a_json_result_with_exit_1(tmp_path, capsys, monkeypatch):
    rows = [_row("adsh", 16, 0, map_all_f=0.5, p_at_1000_f=0.25),
            {"method": "dadh", "bits": 16, "seed": 0, "error": "exit 1: boom (log: x.log)"}]
    monkeypatch.setattr(quality, "run_plan", lambda *args, **kwargs: rows)  # no training
    argv = ["--config", DEBUG, "--methods", "adsh,dadh", "--bits", "16", "--out", str(tmp_path)]
    assert cli.quality_main([*argv, "--json"]) == cli.EXIT_RUN_FAILED
    payload = json.loads(capsys.readouterr().out)
    assert payload["exit_code"] == 1
    assert payload["error"] == "1 of 2 cells failed (see their rows' error)"
    assert payload["rows"] == rows and payload["table"] == str(tmp_path / "table.md")
    assert (tmp_path / "table.md").read_text() == payload["markdown"]
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    # without --json: the same exit code, the table and its path on stdout
    assert cli.quality_main(argv) == cli.EXIT_RUN_FAILED
    assert capsys.readouterr().out == payload["markdown"] + f"table: {tmp_path / 'table.md'}\n"
