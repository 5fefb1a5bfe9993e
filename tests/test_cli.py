"""The tools' shared command line without a trained run: --help and --version before any heavy
import, one flag vocabulary, JSON errors, and the generated table of config keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import tomllib

import pytest
from _repo import DEBUG, ROOT

from dadh_dist import cli, config, config_doc, package_version

JOBS = ("train", "tune", "evaluate", "encode", "search", "export", "quality")
HEAVY = ("torch", "numpy", "ray", "pyarrow", "PIL", "matplotlib")

# One interpreter per tool: run it as a script with --help, then --version, and report what
# it printed and which heavy modules had been imported by then.
_PROBE = """
import contextlib, io, json, runpy, sys
out, target, args = {}, sys.argv[1], sys.argv[2:]
for flag in ("--help", "--version"):
    sys.argv = [target, *args, flag]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__") if sys.argv[0].endswith(".py") \\
                else runpy.run_module("dadh_dist", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            out[flag + " exit"] = e.code
    out[flag] = buf.getvalue()
out["heavy"] = sorted(m for m in @HEAVY@ if m in sys.modules)
print(json.dumps(out))
""".replace("@HEAVY@", repr(HEAVY))


def _probe(target: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, target, *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def probes() -> dict[str, dict]:
    found = {job: _probe(str(ROOT / "jobs" / f"{job}.py")) for job in JOBS}
    found["python -m dadh_dist"] = _probe("dadh_dist")
    found["python -m dadh_dist config"] = _probe("dadh_dist", "config")
    return found


def test_help_and_version_import_no_heavy_module(probes):
    for tool, p in probes.items():
        assert p["--help exit"] == 0 and p["--help"].startswith("usage: "), tool
        assert p["heavy"] == [], f"{tool} --help imported {p['heavy']}"
        assert p["--version exit"] == 0, tool
        assert p["--version"].strip().endswith(f" {package_version()}"), (tool, p["--version"])


def test_every_tool_speaks_the_same_flags(probes):
    def flags(job: str) -> set[str]:
        return {word.strip(",[]") for word in probes[job]["--help"].split()
                if word.lstrip("[").startswith("-")}

    model_tools = ("evaluate", "encode", "search", "export")
    for job in model_tools:
        assert {"--checkpoint", "--device", "--json", "--quiet", "--out"} <= flags(job), job
    assert {"--json", "--quiet"} <= flags("quality") and "--json" in flags("tune")
    for job in ("encode", "search", "export"):
        assert "--encoder" in flags(job) and "--encoders" not in flags(job), job
    assert {"--encoders", "--encoder"} <= flags("evaluate")  # several accepted, both spellings
    for job in ("evaluate", "search"):
        assert {"--topk", "-k"} <= flags(job), job
    for job in ("evaluate", "encode", "search", "train"):
        assert "--batch-size" in flags(job), job
    assert {"--name", "--config"} <= flags("train") and "--name" in flags("tune")
    # old spellings work but are not advertised
    assert "--batch" not in flags("encode") and "--k" not in flags("search")
    # --out says per tool whether it names a file or a folder
    for job, kind in (("encode", "FILE"), ("search", "FILE"), ("evaluate", "FOLDER"),
                      ("export", "FOLDER"), ("quality", "FOLDER")):
        assert f"--out {kind}" in probes[job]["--help"], job


def test_json_usage_error_is_json_on_stdout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.search_main(["--json", "--database", "db.parquet", "--query", "q.parquet",
                         "-k", "many"])
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["exit_code"] == 2 and "-k" in payload["error"] and "many" in payload["error"]
    assert captured.err == ""


def test_json_user_error_is_json_on_stdout(tmp_path, capsys):
    missing = tmp_path / "nope.parquet"
    code = cli.search_main(["--database", str(missing), "--query", str(missing), "--json"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_USER_ERROR and captured.err == ""
    payload = json.loads(captured.out)
    assert payload == {"error": f"{missing}: codes file not found", "exit_code": 2}
    # the same mistake without --json: one line on stderr, nothing on stdout
    assert cli.search_main(["--database", str(missing), "--query", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: {missing}: codes file not found\n"


@pytest.mark.parametrize("main,argv,where", [
    (cli.tune_main, [], "--config"),  # required
    (cli.quality_main, ["--parallel", "two"], "--parallel"),
])
def test_tune_and_quality_usage_errors_are_json_with_json(capsys, main, argv, where):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--json"])
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert exit_info.value.code == payload["exit_code"] == cli.EXIT_USER_ERROR
    assert where in payload["error"] and captured.err == ""


def test_quality_user_errors_are_json_with_json(capsys):
    assert cli.quality_main(["--methods", "dadh,nope", "--json"]) == cli.EXIT_USER_ERROR
    assert json.loads(capsys.readouterr().out) == {
        "error": "--methods: unknown nope; known: dadh, adsh, dadh-no-code, dadh-no-pair",
        "exit_code": 2}
    assert cli.quality_main(["--config", str(DEBUG), "--bits", "16", "objective.gama=3",
                             "--json"]) == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert "objective.gama" in json.loads(captured.out)["error"] and captured.err == ""


def test_stdout_to_stderr_moves_prints_and_file_descriptor_writes(capfd):
    import os

    print("before")
    with cli.stdout_to_stderr():
        print("a print")
        os.write(1, b"a write to fd 1\n")  # what Ray Tune and child processes do
    print("after")
    captured = capfd.readouterr()
    assert captured.out == "before\nafter\n"
    assert captured.err == "a print\na write to fd 1\n"


def test_errors_are_classified_without_importing_their_modules():
    class RunFailed(RuntimeError):  # a class of ours is known by its name along the MRO
        __module__ = "dadh_dist.run.ray_train"

    class Unrelated(ValueError):
        pass

    assert cli._exit_code(config.ConfigError("x")) == cli.EXIT_USER_ERROR
    assert cli._exit_code(FileNotFoundError("x")) == cli.EXIT_USER_ERROR
    assert cli._exit_code(RunFailed("x")) == cli.EXIT_RUN_FAILED
    from dadh_dist.sweep.results import SweepFailed  # light: no Ray

    assert cli._exit_code(SweepFailed("x")) == cli.EXIT_RUN_FAILED
    assert cli._exit_code(Unrelated("x")) is None  # a bug stays a traceback
    with pytest.raises(Unrelated):
        cli.run_main(lambda: (_ for _ in ()).throw(Unrelated("boom")))


# ----------------------------------------------------------------------------------- SIGTERM

# A driver whose body says "ready" on stdout, then sleeps until a SIGTERM (`ray job stop`, a
# scheduler) reaches it; MAIN is its last line.
_DRIVER = """
import signal, sys, time
from dadh_dist import cli

def sleep():
    print("ready", flush=True)
    time.sleep(60)

def made_a_folder_then_sleep():  # check_out makes --out, the tool is then stopped
    cli.check_out(sys.argv[1], "output folder", folder=True)
    sleep()

def ray_init_then_sleep():  # ray.init replaces the handler by its own: sys.exit(signum)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    sleep()

def ray_fit():  # ...and run.ray_train.fit turns that SystemExit into a KeyboardInterrupt
    try:
        ray_init_then_sleep()
    except SystemExit as e:
        raise KeyboardInterrupt from e

def slow_cleanup():
    try:
        sleep()
    except KeyboardInterrupt:
        sleep()

def train():  # train_main as jobs/train.py runs it, its training a sleep
    from dadh_dist import run
    run.run = lambda cfg, progress: sleep()
    return cli.train_main(["--config", sys.argv[2]])

MAIN
"""


def _stopped(main: str, *args, signals: int = 1) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the driver running `main`, sent SIGTERM `signals` times,
    each once the body says it is ready."""
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER.replace("MAIN", main), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for _ in range(signals):
            assert proc.stdout.readline() == "ready\n", proc.stderr.read()
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, out, err


def test_sigterm_stops_a_tool_as_ctrl_c_does_in_one_line_with_exit_143(tmp_path):
    """It ended the process with status 143 and said nothing; now it stops as Ctrl-C does (the
    body's cleanups run: here the --out folder check_out made goes), says so in one line and
    still exits 143, what a scheduler expects of a process it sent SIGTERM."""
    out = tmp_path / "new" / "out"
    code, stdout, stderr = _stopped("sys.exit(cli.run_main(made_a_folder_then_sleep))", out)
    assert (code, stdout, stderr) == (143, "", "error: stopped by SIGTERM; rerun the same "
                                               "command\n")
    assert list(tmp_path.iterdir()) == []
    code, _, stderr = _stopped("sys.exit(train())", tmp_path, DEBUG)
    assert code == 143 and stderr.splitlines() == [
        "error: stopped by SIGTERM; the run keeps its checkpoints: rerun the same command to "
        "resume it"], stderr


@pytest.mark.parametrize("body", ["ray_init_then_sleep", "ray_fit"])
def test_sigterm_under_rays_own_handler_is_said_too_and_json_with_json(body):
    code, stdout, stderr = _stopped(f"sys.exit(cli.run_main({body}, as_json=True))")
    assert code == 143 and stderr == ""
    assert json.loads(stdout) == {"error": "stopped by SIGTERM; rerun the same command",
                                  "exit_code": 143}


def test_a_second_sigterm_during_the_cleanup_ends_the_process_at_once():
    code, _, stderr = _stopped("sys.exit(cli.run_main(slow_cleanup))", signals=2)
    assert code == -signal.SIGTERM and "Traceback" not in stderr  # the shell's 143


def test_run_main_holds_its_sigterm_handler_only_while_it_runs_in_the_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def body():
        seen["during"] = signal.getsignal(signal.SIGTERM)

    assert cli.run_main(body) == 0
    assert seen["during"] not in (before, signal.SIG_DFL, signal.SIG_IGN, None)
    assert signal.getsignal(signal.SIGTERM) is before
    # another thread cannot install one (ValueError): it runs the body without
    thread = threading.Thread(target=lambda: seen.update(thread=cli.run_main(lambda: 7)))
    thread.start()
    thread.join()
    assert seen["thread"] == 7

    def ray_init(signum, frame):  # a handler the body installs (ray.init's) is left in place
        pass

    try:
        assert cli.run_main(lambda: signal.signal(signal.SIGTERM, ray_init) and 0) == 0
        assert signal.getsignal(signal.SIGTERM) is ray_init
    finally:
        signal.signal(signal.SIGTERM, before)


def test_train_name_flag_is_log_name(tmp_path):
    parser = cli.config_parser("x")
    parser.add_argument("--name")
    _, cfg = cli.parse_config(parser, ["--config", str(DEBUG),
                                       "log.name=old", "--name", "new run"],
                              lambda a: [f"log.name={json.dumps(a.name)}"])
    assert cfg.log.name == "new run"


# ------------------------------------------------------------------------------ config table


def test_config_table_lists_every_key_its_default_and_docstring():
    keys = config_doc.keys()
    defaults = config.Config().to_dict()
    assert [k.name for k in keys] == [f"{s}.{f}" for s in defaults for f in defaults[s]]
    for k in keys:
        section, name = k.name.split(".")
        assert tomllib.loads(f"v = {k.default}")["v"] == defaults[section][name], k
        assert k.doc != config_doc.UNDOCUMENTED, f"{k.name}: no docstring in config.py"
    table = config_doc.markdown().splitlines()
    assert len(table) == 2 + len(keys)
    gamma = next(line for line in table if line.startswith("| `objective.gamma` |"))
    assert gamma.split(" | ")[1:3] == ["float", "`2000.0`"]
    # a docstring holding '|' must not split its cell
    assert all(line.count(" | ") == 3 for line in table[2:])


def test_field_docs_reads_the_string_after_each_field():
    source = '''
@dataclass
class A:
    x: int = 1
    """First line,
    second line | with a pipe."""
    y: str = ""
    z: float = 0.0
    """Zed."""
'''
    assert config_doc.field_docs(source) == {
        "A": {"x": "First line, second line | with a pipe.", "z": "Zed."}}


def test_readme_carries_the_current_config_table():
    readme = (ROOT / "README.md").read_text()
    assert config_doc.block_in(readme) == config_doc.markdown(), (
        "README.md's config table is stale: run python -m dadh_dist config --update-readme")


def test_update_readme_rewrites_only_the_block(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{config_doc.BEGIN}\n| old |\n{config_doc.END}\noutro\n")
    assert config_doc.update(doc) is True
    text = doc.read_text()
    assert text.startswith(f"intro\n{config_doc.BEGIN}\n| key | type |")
    assert text.endswith(f"{config_doc.END}\noutro\n")
    assert config_doc.block_in(text) == config_doc.markdown()
    assert config_doc.update(doc) is False
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="no config table markers"):
        config_doc.update(doc)


def test_config_command_prints_the_resolved_config(capsys):
    from dadh_dist.__main__ import main

    assert main(["config", "--config", str(DEBUG),
                 "train.outer_iters=7"]) == 0
    resolved = tomllib.loads(capsys.readouterr().out)
    assert resolved["train"]["outer_iters"] == 7 and resolved["data"]["source"] == "digits"
    assert config.from_dict(resolved).train.outer_iters == 7
    assert main(["config", "nope.key=1"]) == cli.EXIT_USER_ERROR
    assert "nope.key" in capsys.readouterr().err


def test_python_m_dadh_dist_commands_name_themselves_as_typed(capsys):
    from dadh_dist.__main__ import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--version"])
    assert capsys.readouterr().out.strip() == f"python -m dadh_dist evaluate {package_version()}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m dadh_dist train ")


@pytest.mark.parametrize("argv,says", [
    (["-k", "many"], "argument --topk/-k: invalid int value: 'many'"),
    (["--frobnicate", "3"], "unrecognized arguments: --frobnicate 3"),
    (["--backend", "annoy"], "argument --backend: invalid choice: 'annoy'"),
])
def test_usage_errors_are_one_line_naming_the_option_and_exit_2(capsys, argv, says):
    with pytest.raises(SystemExit) as exit_info:
        cli.search_main(["--database", "db.parquet", "--query", "q.parquet", *argv])
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert lines[0].endswith("(see --help)")


def test_ctrl_c_says_how_to_go_on_for_a_run_and_a_sweep(capsys):
    def stopped():
        raise KeyboardInterrupt

    assert cli.run_main(stopped) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    assert cli.run_main(stopped, resume=cli.TRAIN_RESUME) == 130
    assert capsys.readouterr().err == ("error: interrupted; the run keeps its checkpoints: rerun "
                                       "the same command to resume it\n")


def _check_data_main(argv):
    from dadh_dist.__main__ import check_data_main

    return check_data_main(argv)


def _config_main(argv):
    from dadh_dist.__main__ import config_main

    return config_main(argv)


@pytest.mark.parametrize("main,argv", [
    (cli.train_main, ["--config", str(DEBUG)]),
    (cli.tune_main, ["--config", str(ROOT / "configs" / "sweep_debug.toml")]),
    (cli.quality_main, ["--config", str(DEBUG), "--bits", "16"]),
    (_check_data_main, ["--config", str(DEBUG)]),
    (_config_main, []),
])
@pytest.mark.parametrize("unknown", [["--nope"], ["--nope=3"], ["-x", "train.seed=1"]])
def test_tools_taking_overrides_refuse_an_unknown_option_as_a_usage_error(main, argv, unknown,
                                                                          capsys):
    """`train --nope` said `nope: missing value (use nope=VALUE)`: an option that is no
    section.key is refused as evaluate refuses it, one line and exit 2, before anything runs."""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *unknown])
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert err.endswith(f": unrecognized arguments: {unknown[0]} (see --help)\n"), err


def test_overrides_in_keeps_every_spelling_of_an_override():
    parser = cli.config_parser("x")
    given = ["--objective.gamma", "5", "--train.seed", "-3", "--optim.lr_f=0.5",
             "train.outer_iters=2"]
    args, extra = parser.parse_known_args(["--config", str(DEBUG), *given])
    assert cli.overrides_in(parser, extra) == given and args.config == str(DEBUG)


def test_help_of_the_tools_taking_overrides_shows_them_and_parsing_is_unchanged(capsys):
    """check-data --help did not say it takes data.root=...; the usage of each tool that takes
    overrides now ends with them, and they are listed with an example."""
    from dadh_dist.__main__ import main

    for command in ("check-data", "train", "tune", "quality", "config"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = capsys.readouterr().out
        usage = shown.split("\n\n", 1)[0]
        assert usage.rstrip().endswith(f"[{cli.OVERRIDES_METAVAR} ...]"), (command, usage)
        assert f"  {cli.OVERRIDES_METAVAR}  " in shown, command
    with pytest.raises(SystemExit):
        main(["check-data", "--help"])
    assert "data.root=" in capsys.readouterr().out
    # shown only: the parser still leaves every override to overrides_in, in order
    parser = cli.config_parser("x")
    parser.format_help()
    args, extra = parser.parse_known_args(["a.b=1", "--config", "c", "d.e=2"])
    assert extra == ["a.b=1", "d.e=2"] and not hasattr(args, "overrides")
    assert "[--config CONFIG] [section.key=value ...]" in parser.format_usage()


def test_quality_help_shows_its_default_config_and_a_quick_run(capsys):
    with pytest.raises(SystemExit):
        cli.quality_main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: configs/fashion_mnist_{bits}.toml)" in shown
    assert "takes hours on a CPU" in shown
    assert "--config configs/debug_cpu.toml --bits 16" in shown


def test_serve_help_names_its_checkpoint_as_the_other_tools_do():
    from dadh_dist import serve

    assert "--checkpoint RUN|CKPT" in serve.parser().format_usage()


def test_a_sigterm_while_the_error_line_is_written_is_no_traceback(monkeypatch, capsys):
    """Once the body is over, a SIGTERM only counts: raising in the handler then escaped the
    error line being written as a traceback (exit 130)."""
    def bad():
        raise config.ConfigError("x.y: bad")

    real_fail = cli.fail

    def fail_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the main thread
        return real_fail(*args, **kwargs)

    monkeypatch.setattr(cli, "fail", fail_signalled)
    try:
        code = cli.run_main(bad)
    except KeyboardInterrupt:  # what escaped before (caught: it would stop pytest)
        pytest.fail("the SIGTERM escaped run_main")
    assert code == 2 and capsys.readouterr().err == "error: x.y: bad\n"
