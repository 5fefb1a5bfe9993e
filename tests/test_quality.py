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


def test_threads_reach_the_trainer_as_its_cpus_per_worker(tmp_path, monkeypatch):
    """--threads is the run's torch thread count: the in-process trainer sets it from
    scaling.cpus_per_worker, so an environment variable alone would not hold it (the trainer
    would use the config's 2)."""
    from dadh_dist.run import local
    from dadh_dist.run.local import worker_threads

    monkeypatch.setattr(local, "usable_cpus", lambda: 8)  # never capped by this machine's
    cell = quality.Cell("adsh", 16, 0)
    plan = quality.Plan(DEBUG, tmp_path, threads=3)
    assert worker_threads(config.load(DEBUG, plan.cell_overrides(cell))) == 3
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


@pytest.mark.parametrize("override, flag", [
    ("train.seed=7", "--seeds"), ("objective.bits=8", "--bits"), ("log.run_dir=x", "--out"),
    ("log.name=x", "--out"), ("scaling.use_ray=true", "in-process"),
    ("scaling.cpus_per_worker=2", "--threads"), ("objective.use_pair=false", "--methods"),
    ("--method-override=dadh:train.seed=3", "--seeds"),
    ("--method-override=dadh:objective.use_code=false", "--methods"),
])
def test_overrides_of_what_a_cell_or_a_method_sets_are_refused(tmp_path, capsys, monkeypatch,
                                                                override, flag):
    """An override applied after a cell's own seed, bits or folder made every cell the same
    run (a false table, exit 0); one of a method's keys relabels it."""
    monkeypatch.setattr(quality, "run_plan", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "q"
    argv = ["--config", DEBUG, "--methods", "dadh,adsh", "--bits", "16", "--out", str(out),
            override]
    assert cli.quality_main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    key = override.rsplit(":", 1)[-1].split("=")[0]
    assert len(err.splitlines()) == 1 and key in err and flag in err
    assert not out.exists()


def test_the_keys_refused_are_the_ones_a_cell_and_the_methods_set(tmp_path):
    plan = quality.Plan(DEBUG, tmp_path, threads=1)
    for method in quality.METHODS:
        keys = set(config.parse_overrides(plan.cell_overrides(quality.Cell(method, 16, 0))))
        assert keys - quality.METHOD_KEYS == set(quality.CELL_KEYS)
    assert quality.METHOD_KEYS == {"objective.two_streams", "objective.use_pair",
                                   "objective.use_code", "eval.encoders"}


def test_a_finished_cell_is_reused_whatever_its_thread_count(tmp_path):
    """--parallel (CPUs / parallel threads) or --threads changed: the finished cell is read back,
    with the command it ran with, not refused (which wiped the table)."""
    cell = quality.Cell("adsh", 16, 0)
    _finish(quality.Plan(DEBUG, tmp_path, threads=1), cell, map_all_f=0.5)
    plan = quality.Plan(DEBUG, tmp_path, threads=2)
    quality.check_reuse(plan, [cell])
    row = quality.run_cell(plan, cell)
    assert row["metrics"]["map_all_f"] == 0.5
    assert "scaling.cpus_per_worker=1 " in row["command"]


def test_another_budget_is_refused_up_front_and_the_table_is_kept(tmp_path, capsys, monkeypatch):
    plan = quality.Plan(DEBUG, tmp_path, threads=1)
    _finish(plan, quality.Cell("adsh", 16, 0), map_all_f=0.5)
    (tmp_path / "table.md").write_text("good table")
    monkeypatch.setattr(quality, "run_plan", lambda *a, **k: pytest.fail("trained"))
    argv = ["--config", DEBUG, "--methods", "adsh,dadh", "--bits", "16", "--out", str(tmp_path),
            "train.outer_iters=9"]
    for extra in ([], ["--table-only"]):
        assert cli.quality_main([*argv, *extra]) == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert "adsh_16b_s0 finished with another config (train.outer_iters: 4 -> 9)" in err
        assert "use another --out" in err
    assert (tmp_path / "table.md").read_text() == "good table"
    assert not (tmp_path / "dadh_16b_s0").exists()


def test_the_table_covers_every_cell_finished_in_the_folder(tmp_path, capsys):
    """A second invocation with other methods kept only its own rows."""
    plan = quality.Plan(DEBUG, tmp_path, threads=1)
    _finish(plan, quality.Cell("adsh", 16, 0), map_all_f=0.5, p_at_1000_f=0.25)
    _finish(plan, quality.Cell("dadh", 16, 1), map_all_f=0.75, p_at_1000_f=0.5)
    # another budget's cell in the same folder is another experiment: not in this table
    _finish(quality.Plan(DEBUG, tmp_path, ["train.outer_iters=9"], threads=1),
            quality.Cell("dadh", 16, 2), map_all_f=0.1)
    argv = ["--config", DEBUG, "--methods", "dadh", "--seeds", "1", "--bits", "16",
            "--out", str(tmp_path), "--threads", "1"]
    assert cli.quality_main(argv) == 0
    text = (tmp_path / "table.md").read_text()
    assert "| dadh | 16 | 1 | 0.750 |" in text and "| adsh | 16 | 1 | 0.500 |" in text
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["method"], r["seed"]) for r in rows] == [("dadh", 1), ("adsh", 0)]
    assert text in capsys.readouterr().out


def test_a_rerun_without_a_finished_cell_keeps_the_table(tmp_path, capsys, monkeypatch):
    (tmp_path / "table.md").write_text("good table")
    (tmp_path / "rows.json").write_text("[]")
    rows = [{"method": "dadh", "bits": 16, "seed": 0, "error": "exit 1: boom (log: x.log)"}]
    monkeypatch.setattr(quality, "run_plan", lambda *args, **kwargs: rows)
    argv = ["--config", DEBUG, "--methods", "dadh", "--bits", "16", "--out", str(tmp_path)]
    assert cli.quality_main(argv) == cli.EXIT_RUN_FAILED
    assert "left as they were" in capsys.readouterr().err
    assert (tmp_path / "table.md").read_text() == "good table"
    assert (tmp_path / "rows.json").read_text() == "[]"


@pytest.mark.parametrize("flags, where", [
    (["--seeds", "0,0"], "--seeds"), (["--methods", "dadh,adsh,dadh"], "--methods"),
    (["--bits", ""], "--bits"), (["--methods", " , "], "--methods"),
    (["--parallel", "0"], "--parallel"),
])
def test_duplicate_or_no_cells_and_no_parallelism_are_refused(tmp_path, capsys, flags, where):
    argv = ["--config", DEBUG, "--bits", "16", "--out", str(tmp_path / "q"), *flags]
    try:
        rc = cli.quality_main(argv)
    except SystemExit as e:  # a usage error, as argparse exits
        rc = e.code
    assert rc == cli.EXIT_USER_ERROR
    assert where in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_an_out_that_cannot_be_the_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = ["--config", DEBUG, "--bits", "16", "--out", str(tmp_path / "file")]
    assert cli.quality_main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {tmp_path / 'file'}: is a file; --out names the folder of the " \
                  "runs and the table to write into"


def test_cells_with_other_metric_keys_get_a_table_each():
    """--method-override dadh:eval.topk=100 crashed the table (max() of an empty sequence)."""
    rows = [_row("dadh", 16, 0, map_at_100_f=0.9, map_at_100_g=0.8, map_at_100_fg=0.85,
                 p_at_1000_f=0.7),
            _row("adsh", 16, 0, map_all_f=0.5, p_at_500_f=0.4),
            _row("adsh", 12, 0)]  # no mAP at all: a line, not a crash
    tables = quality.table(rows).split("\n\n")  # by bits, then method, as one table did
    assert len(tables) == 3
    assert "| adsh | 12 | 1 | — | — | — | — (—) | 10 |" in tables[0]
    assert "| map_at_100 f |" in tables[1] and "| dadh | 16 | 1 | 0.900 | 0.800 | 0.850 | " \
        "0.700 (f) |" in tables[1]
    assert "| p_at_500 (best) |" in tables[2] and "| adsh | 16 | 1 | 0.500 | — | — | 0.400 (f)" \
        in tables[2]


def test_truncated_metrics_are_an_error_row_and_config_paths_may_hold_braces(tmp_path):
    cell = quality.Cell("adsh", 16, 0)
    plan = quality.Plan(DEBUG, tmp_path)
    _finish(plan, cell)
    quality.metrics_path(plan, cell).write_text('{"map_all_f": 0.')
    row = quality.run_cell(plan, cell)
    assert "metrics" not in row and row["error"].startswith(
        f"{quality.metrics_path(plan, cell)}: not a finished run's metrics")
    assert quality.Plan("/tmp/{foo}_{bits}.toml", tmp_path).config_path(cell) == \
        "/tmp/{foo}_16.toml"


def test_a_rerun_appends_to_the_cells_log(tmp_path, monkeypatch):
    outputs = iter([b"first try\n", b"second try\n"])

    def trainer(cmd, stdout, **kwargs):  # a trainer that fails, without training
        stdout.write(next(outputs))
        return 1

    monkeypatch.setattr(quality.subprocess, "call", trainer)
    cell = quality.Cell("adsh", 16, 0)
    plan = quality.Plan(DEBUG, tmp_path, threads=1)
    quality.run_cell(plan, cell)
    row = quality.run_cell(plan, cell)
    assert row["error"] == f"exit 1: second try (log: {tmp_path / 'adsh_16b_s0.log'})"
    log = (tmp_path / "adsh_16b_s0.log").read_text().splitlines()
    assert [line for line in log if not line.startswith("==== ")] == ["first try", "second try"]
    assert log[0].endswith(row["command"]) and log[2].endswith(row["command"])


def test_a_config_file_that_sets_what_a_method_sets_is_refused_up_front(tmp_path, capsys,
                                                                        monkeypatch):
    """`objective.use_pair = false` in the --config file made the "dadh" row DADH without
    L_pair (dadh sets nothing, so the file won): an ablation under dadh's name, exit 0."""
    monkeypatch.setattr(quality, "run_plan", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "table.md").write_text("good table")
    no_pair = tmp_path / "no_pair.toml"
    no_pair.write_text(config.load(DEBUG, ["objective.use_pair=false"]).to_toml())
    argv = ["--config", str(no_pair), "--methods", "adsh,dadh", "--bits", "16",
            "--out", str(tmp_path), "--threads", "1"]
    assert cli.quality_main(argv) == cli.EXIT_USER_ERROR
    assert capsys.readouterr().err.splitlines() == [
        f"error: {no_pair} sets objective.use_pair=false, which the methods set (dadh runs "
        "objective.use_pair=true; see quality.METHODS): remove it from the file and pick the "
        "methods with --methods"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_pair.toml", "table.md"]
    assert (tmp_path / "table.md").read_text() == "good table"
    # the value adsh runs anyway changes nothing of adsh's cell; a key adsh does not set does
    cell = quality.Cell("adsh", 16, 0)
    assert quality.Plan(str(no_pair), tmp_path).load(cell) == config.load(
        DEBUG, quality.Plan(DEBUG, tmp_path).cell_overrides(cell))
    one_encoder = tmp_path / "f_only.toml"
    one_encoder.write_text(config.load(DEBUG, ['eval.encoders=["f"]']).to_toml())
    # fewer encoders evaluated is the same method trained
    one = quality.Plan(str(one_encoder), tmp_path).load(quality.Cell("dadh-no-pair", 16, 0))
    assert one.eval.encoders == ["f"] and not one.objective.use_pair
    # refused before --out is made
    argv[argv.index("--out") + 1] = str(tmp_path / "new")
    assert cli.quality_main(argv) == cli.EXIT_USER_ERROR
    assert "sets objective.use_pair=false" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # a file that spells out every default (to_toml writes them all) is every method's
    every_key = tmp_path / "every_key.toml"
    every_key.write_text(config.load(DEBUG).to_toml())
    for method in quality.METHODS:
        cell = quality.Cell(method, 16, 0)
        assert quality.Plan(str(every_key), tmp_path).load(cell) == config.load(
            DEBUG, quality.Plan(DEBUG, tmp_path).cell_overrides(cell))


@pytest.mark.parametrize("key, value", [
    ("map_all_fg", "oops"), ("map_all_f", None), ("p_at_1000_f", True), ("wall_s", [1.0]),
])
def test_a_non_numeric_metric_is_an_error_row_not_a_traceback(tmp_path, key, value):
    """The progress line (:.4f) and the table (a mean) crashed on a finished cell's mAP that is
    no number."""
    cell = quality.Cell("adsh", 16, 0)
    plan = quality.Plan(DEBUG, tmp_path)
    _finish(plan, cell, **{"map_all_f": 0.5, "p_at_1000_f": 0.25, key: value})
    lines = []
    rows = quality.run_plan(plan, [cell], progress=lines.append, train=False)
    done = quality.metrics_path(plan, cell)
    assert rows[0]["error"] == (f"{done}: not a finished run's metrics ({key}: "
                                f"{json.dumps(value)}, not a number); delete it to rerun the cell")
    assert "metrics" not in rows[0] and lines == [f"adsh_16b_s0: {rows[0]['error']}"]
    assert quality.table(rows) == "(no finished runs)\n"


@pytest.mark.parametrize("item", ["adsh:--nope", "adsh:train.outer_iters"])
def test_a_method_override_without_key_value_names_the_form(item, capsys):
    """`--method-override adsh:--nope` read as an override missing its value."""
    assert cli.quality_main(["--config", DEBUG, "--method-override", item]) == \
        cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"--method-override {item!r}: expected METHOD:KEY=VALUE" in err, err
