import dataclasses
import json
import typing

import pytest
from _repo import DEBUG, ROOT, job

from dadh_dist import config
from dadh_dist.config import ConfigError


def test_precedence_defaults_file_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[objective]\ngamma = 50\neta = 2.0\n[train]\nbatch_size = 32\n")
    cfg = config.load(f, ["objective.gamma=7", "--optim.lr_f=0.5"])
    assert cfg.objective.gamma == 7.0  # CLI beats file
    assert cfg.objective.eta == 2.0  # file beats default
    assert cfg.train.batch_size == 32
    assert cfg.optim.lr_f == 0.5
    assert cfg.objective.bits == 32  # default
    assert isinstance(cfg.objective.gamma, float)


def test_toml_round_trip(tmp_path):
    cfg = config.load(None, ["objective.bits=48", "eval.encoders=['fg']", "data.root=a b"])
    path = tmp_path / "r.toml"
    path.write_text(cfg.to_toml())
    again = config.load(path)
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()


@pytest.mark.parametrize("override, message", [
    ("objective.gamm=1", "objective.gamm: unknown key (did you mean gamma?)"),
    ("objectiv.gamma=1", "objectiv.gamma: unknown section"),
    ("objective.bits=abc", "objective.bits: expected int"),
    ("objective.bits=1.5", "objective.bits: expected int"),
    ("objective.use_pair=1", "objective.use_pair: expected bool"),
    ("objective.bits=0", "objective.bits: must be >= 1"),
    ("objective.gamma=-1", "objective.gamma: must be >= 0"),
    ("model.backbone=vit", "model.backbone: 'vit' is not one of"),
    ("train.batch_size=3", "train.batch_size: 3 is not divisible"),
    ("optim.lr_f=0", "optim.lr_f: must be > 0"),
    ("train.amp=fp16", "train.amp: 'fp16' is not one of"),
    ("train.tf32=1", "train.tf32: expected bool"),
    ("log.name=ablation/g100", "log.name: 'ablation/g100' must be one folder name"),
    ("log.name=..", "log.name: '..' must be one folder name"),
    ('log.run_dir="s3://AKIA:s3cret@bucket/runs"', "log.run_dir: the URI carries a secret"),
    ('log.run_dir="s3://AKIA:wJal/K7MD@bucket/runs"', "log.run_dir: the URI carries a secret"),
    ("objective.gamma=nan", "objective.gamma: must be a finite number, got nan"),
    ("optim.lr_f=inf", "optim.lr_f: must be a finite number, got inf"),
    ("scaling.cpus_per_worker=inf", "scaling.cpus_per_worker: must be a finite number"),
    ("train.seed=99999999999999999999", "train.seed: 99999999999999999999 does not fit in 64"),
    ("data.query_per_class=0", "data.query_per_class: must be >= 1, got 0"),
])
def test_bad_values_name_the_key(override, message):
    extra = ["scaling.num_workers=2"] if "batch_size" in override else []
    with pytest.raises(ConfigError) as e:
        config.load(None, [override, *extra])
    assert message in str(e.value)


@pytest.mark.parametrize("override", ["=3", " =3", ".gamma=1", "objective.=1",
                                      "objective.gamma.x=1", "--=3"])
def test_an_override_with_a_key_of_the_wrong_shape_is_named_whole(override):
    """`=3` said `: keys have the form ...`: the empty key it named showed as nothing."""
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert str(e.value) == (f"override {override!r}: keys have the form section.field "
                            "(e.g. train.outer_iters=3)")


def test_list_fields_take_comma_separated_values_on_the_command_line(tmp_path):
    """eval.encoders=f,fg as the tools' --encoders f,fg, besides TOML's ['f', 'fg'] (it said
    `expected list, got 'f,fg'`); members are checked as before."""
    lists = {f"{s.name}.{n}" for s in dataclasses.fields(config.Config)
             for n, t in config._section_types(s.default_factory().__class__).items()
             if typing.get_origin(t) is list}
    assert lists == {"eval.encoders"}  # a new list field: give it the rule below, or say why not
    assert all(config._is_str_list(k) for k in lists)
    for given, expected in (("f,fg", ["f", "fg"]), (" fg , g ", ["fg", "g"]), ("fg", ["fg"]),
                            ('["f", "fg"]', ["f", "fg"]), ('"g"', ["g"])):
        assert config.load(None, [f"eval.encoders={given}"]).eval.encoders == expected, given
        assert config.load(None, ["--eval.encoders", given]).eval.encoders == expected, given
    with pytest.raises(ConfigError, match=r"^eval.encoders: 'x' is not one of f, g, fg$"):
        config.load(None, ["eval.encoders=f,x"])
    with pytest.raises(ConfigError, match="^eval.encoders: name at least one of f, g, fg$"):
        config.load(None, ["eval.encoders=,"])
    syntax = ('eval.encoders: expected a list of str (on the command line eval.encoders=f,g,fg, '
              'in TOML ["f", "g", "fg"]), got ')
    for given, shown in (("3", "3"), ("[f,fg]", "'[f,fg]'")):  # not a list: the syntax that is
        with pytest.raises(ConfigError) as e:
            config.load(None, [f"eval.encoders={given}"])
        assert str(e.value) == syntax + shown
    # a config file is data: a string there stays a string, refused with the same hint
    (tmp_path / "c.toml").write_text('[eval]\nencoders = "f,fg"\n')
    with pytest.raises(ConfigError) as e:
        config.load(tmp_path / "c.toml")
    assert str(e.value) == syntax + "'f,fg'"


def test_run_dir_uri_may_name_a_user_without_secret():
    assert config.load(None, ['log.run_dir="hdfs://alice@namenode:8020/runs"']).log.run_dir \
        == "hdfs://alice@namenode:8020/runs"


def test_gpu_needs_ray():
    with pytest.raises(ConfigError, match=r"scaling.use_gpu: needs scaling.use_ray = true"):
        config.load(None, ["scaling.use_gpu=true", "scaling.use_ray=false"])
    assert config.load(None, ["scaling.use_gpu=true"]).scaling.use_gpu


def test_batch_divisible_by_workers():
    with pytest.raises(ConfigError, match="train.batch_size: 66 is not divisible"):
        config.load(None, ["scaling.num_workers=4", "train.batch_size=66"])
    config.load(None, ["scaling.num_workers=4", "train.batch_size=64"])


@pytest.mark.parametrize("overrides, message", [
    (["scaling.num_workers=2", "scaling.min_workers=3"],
     "scaling.min_workers: must be between 1 and scaling.num_workers=2 (0 = fixed size), got 3"),
    (["scaling.num_workers=2", "scaling.min_workers=1"],
     "scaling.max_failures: an elastic run (scaling.min_workers > 0) restarts after losing "
     "workers; must be >= 1, got 0"),
    (["scaling.num_workers=2", "scaling.min_workers=1", "scaling.max_failures=1",
      "scaling.use_ray=false"],
     "scaling.min_workers: an elastic worker range needs scaling.use_ray = true"),
    (["scaling.num_workers=4", "scaling.min_workers=2", "scaling.max_failures=1",
      "train.batch_size=64"],
     "train.batch_size: 64 is not divisible by 3 workers, a size the elastic range "
     "scaling.min_workers..num_workers = 2..4 allows; use a multiple of 12"),
    (["scaling.min_workers=-1"], "scaling.min_workers: must be >= 0, got -1"),
    (["scaling.start_timeout_s=0"], "scaling.start_timeout_s: must be > 0, got 0.0"),
])
def test_elastic_worker_range_is_checked(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, overrides)
    assert str(e.value).startswith(message)


def test_elastic_range_and_start_timeout_leave_the_result_and_run_name_alone():
    fixed = config.load(None, ["scaling.num_workers=4", "train.batch_size=48"])
    elastic = config.load(None, ["scaling.num_workers=4", "scaling.min_workers=2",
                                 "scaling.max_failures=3", "scaling.start_timeout_s=20",
                                 "scaling.collective_timeout_s=90", "train.batch_size=48"])
    # a fixed-size run can be resumed with an elastic range (same fingerprint, same run name)
    assert elastic.fingerprint() == fixed.fingerprint()
    config.load(None, ["scaling.num_workers=2", "scaling.min_workers=2"])  # = fixed size


def test_cli_user_error_exit_code_2_no_traceback():
    proc = job("train", "--objective.gamma=-3", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: objective.gamma: must be >= 0, got -3.0"]


def test_config_file_that_is_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff[data]\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not UTF-8 text \(byte 0\)"):
        config.load(bad)


def test_cli_missing_config_file():
    proc = job("train", "--config", "nope.toml", timeout=120)
    assert proc.returncode == 2
    assert "nope.toml does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        if path.name.startswith("sweep_"):
            continue
        config.load(path)


def test_missing_data_root_is_exit_2_before_ray_starts(tmp_path, monkeypatch, capsys):
    """With scaling.use_ray = true the data is read inside the workers; a missing folder must
    stop the run here first, as a user error naming the key, without starting Ray."""
    from dadh_dist import cli
    from dadh_dist.run import ray_train

    def never(*args, **kw):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_train, "ensure_ray", never)
    monkeypatch.setattr(ray_train, "build_trainer", never)
    missing = tmp_path / "no_such_folder"
    code = cli.train_main(["--config", str(DEBUG),
                           "data.source=fashion_mnist", f"data.root={missing}",
                           f"log.run_dir={tmp_path / 'runs'}", "scaling.use_ray=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: data.root: {missing} does not exist (data.source = fashion_mnist "
                   "reads the Fashion-MNIST IDX files from it)"]
    assert not (tmp_path / "runs").exists()  # no run folder left behind either
    # a relative folder reaches the workers resolved: their working directory is not ours
    seen = {}

    def capture(cfg, folder):
        seen["root"] = cfg.data.root
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_train, "build_trainer", capture)
    monkeypatch.setattr(ray_train, "ensure_ray", lambda **kw: None)
    monkeypatch.setattr(ray_train, "check_fits", lambda cfg: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "idx").mkdir()
    with pytest.raises(AssertionError, match="Ray was started"):
        cli.train_main(["--config", str(DEBUG), "data.source=fashion_mnist", "data.root=idx",
                        f"log.run_dir={tmp_path / 'runs'}", "scaling.use_ray=true"])
    assert seen["root"] == str(tmp_path / "idx")
    monkeypatch.setattr(ray_train, "ensure_ray", never)
    monkeypatch.setattr(ray_train, "build_trainer", never)
    # on a cluster the workers read the data on their own nodes: the driver does not judge it
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(AssertionError, match="Ray was started"):
        cli.train_main(["--config", str(DEBUG),
                        "data.source=fashion_mnist", f"data.root={missing}",
                        f"log.run_dir={tmp_path / 'runs'}", "scaling.use_ray=true"])


def test_a_data_root_for_digits_is_exit_2_not_ignored(tmp_path, monkeypatch, capsys):
    """digits is scikit-learn's bundled copy: a data.root the user set is refused in one line
    naming the key and the source, before Ray or a run folder, not trained past silently. On a
    cluster the driver judges no folder, but still what the setting alone tells."""
    from dadh_dist import cli
    from dadh_dist.data import check_root
    from dadh_dist.run import ray_train

    def never(*args, **kw):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_train, "ensure_ray", never)
    monkeypatch.setattr(ray_train, "build_trainer", never)
    check_root(config.load(DEBUG).data)  # the shipped debug config sets no root
    mine = tmp_path / "my_images"
    mine.mkdir()
    # on a cluster (RAY_ADDRESS) too: the setting alone tells, whatever the workers' disks hold
    for use_ray, cluster in (("true", False), ("false", False), ("true", True)):
        if cluster:
            monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
        code = cli.train_main(["--config", str(DEBUG), f"data.root={mine}",
                               f"log.run_dir={tmp_path / 'runs'}", f"scaling.use_ray={use_ray}"])
        assert code == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: data.root: data.source = digits reads no folder (it uses scikit-learn's "
            f"copy in its wheel), but data.root = '{mine}'; leave data.root empty, or set "
            "data.source to the format of that data"]
        assert not (tmp_path / "runs").exists()
    code = cli.train_main(["--config", str(DEBUG), "data.source=parquet",
                           f"log.run_dir={tmp_path / 'runs'}", "scaling.use_ray=true"])
    assert code == 2
    assert "data.root: data.source = parquet needs a folder" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    # weight 0 is the term switched off (LossWeights): B would never be learned
    (["objective.gamma=0", "objective.eta=0"],
     "objective.gamma: B is learned from L_quant and L_code, and both are off (L_quant: "
     "objective.gamma = 0; L_code: objective.eta = 0); keep one on with a weight above 0"),
    (["objective.gamma=0", "objective.use_code=false"],
     "objective.gamma: B is learned from L_quant and L_code, and both are off (L_quant: "
     "objective.gamma = 0; L_code: objective.use_code = false)"),
    (["objective.use_quant=false", "objective.eta=0"],
     "objective.eta: B is learned from L_quant and L_code, and both are off (L_quant: "
     "objective.use_quant = false; L_code: objective.eta = 0)"),
    (["objective.use_quant=false", "objective.use_code=false"],
     "objective.use_code: B is learned from L_quant and L_code, and both are off"),
    # torch refuses a scalar beyond float32 with a traceback at the first step (Adam: 10·lr)
    (["optim.lr_f=1e38"], "optim.lr_f: must be at most 3.4e+37 (it scales float32 tensors), "
     "got 1e+38"),
    (["optim.lr_g=1e300"], "optim.lr_g: must be at most 3.4e+37"),
    (["optim.weight_decay=1e39"], "optim.weight_decay: must be at most 3.4e+37"),
    (["objective.gamma=1e300"], "objective.gamma: must be at most 3.4e+37"),
    (["optim.momentum=1"], "optim.momentum: must be below 1"),
    (["optim.optimizer=sgd", "optim.momentum=5"], "optim.momentum: must be below 1"),
    # the backbone's pooling leaves no pixel: refused here, not in a Ray worker
    (["model.input_size=3"], "model.input_size: small_cnn needs at least 4 px (got 3)"),
    (["model.backbone=alexnet", "model.input_size=62"],
     "model.input_size: alexnet needs at least 63 px (got 62)"),
    (["model.backbone=vgg16", "model.input_size=31"],
     "model.input_size: vgg16 needs at least 32 px (got 31)"),
])
def test_combinations_that_cannot_train_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load(DEBUG, overrides)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("overrides", [
    *[[f"{key}={value}"] for key, allowed in config.CHOICES.items() for value in allowed],
    # the documented zeros: "all", "only at the end", "source default", "fixed size", ...
    ["eval.topk=0", "train.eval_every=0", "data.database_limit=0", "data.image_size=0",
     "model.input_size=0", "scaling.min_workers=0", "scaling.max_failures=0"],
    ["objective.gamma=0"], ["objective.eta=0"], ["objective.alpha=0"],
    ["objective.use_quant=false"], ["objective.use_code=false", "objective.use_pair=false"],
    ["objective.two_streams=false", "objective.use_pair=false", "eval.encoders=['f']"],
    ["optim.lr_f=3.4e37"], ["optim.momentum=0.99"], ["optim.momentum=0"],
    ["model.input_size=4"], ["model.backbone=alexnet", "model.input_size=63"],
    ["model.backbone=resnet18", "model.input_size=1"],
    ["scaling.use_ray=false", "scaling.cpus_per_worker=0.5"],
    ["train.nonfinite=skip", "train.max_skipped=0"],
    ["objective.bits=1"], ["objective.bits=1025"], ["train.num_samples=1", "train.batch_size=1"],
])
def test_documented_values_are_accepted(overrides):
    config.load(DEBUG, overrides)


def test_cli_refuses_a_combination_in_one_line_before_any_run_folder(tmp_path, capsys):
    from dadh_dist import cli

    code = cli.train_main(["--config", str(DEBUG), "objective.gamma=0", "objective.eta=0",
                           "scaling.use_ray=false", f"log.run_dir={tmp_path / 'runs'}"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: objective.gamma: B is learned from L_quant and L_code, and both are off "
        "(L_quant: objective.gamma = 0; L_code: objective.eta = 0); keep one on with a weight "
        "above 0"]
    assert not (tmp_path / "runs").exists()


def test_pretrained_weights_are_checked_before_ray_starts_workers(tmp_path, monkeypatch):
    """Under Ray the workers read model.pretrained_path: a missing or unreadable file failed
    in every worker, max_failures times, then as a run failure (exit 1)."""
    from dadh_dist.run.local import data_here

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(config.ConfigError, match="model.pretrained_path: small_cnn has no"):
        config.load(DEBUG, ["model.pretrained_path=w.pt"])
    base = ["model.backbone=resnet18", f"model.pretrained_path={json.dumps(str(tmp_path / 'w'))}"]
    with pytest.raises(FileNotFoundError, match=r"model.pretrained_path: .*w does not exist"):
        data_here(config.load(DEBUG, base))
    (tmp_path / "w").write_bytes(b"not torch")
    with pytest.raises(config.ConfigError, match="is not a readable torch weights file"):
        data_here(config.load(DEBUG, base))
    data_here(config.load(DEBUG, [*base, "scaling.use_ray=false"]))  # read when it is built


def test_a_run_that_cannot_fit_the_ray_started_here_is_refused():
    """Ray started on this machine has what this machine has: workers asking for more waited
    scaling.start_timeout_s, max_failures + 1 times, and the error blamed a lost node."""
    from dadh_dist.run.ray_train import check_fits

    with pytest.raises(ConfigError, match="data.image_size: data.source = digits has images"):
        config.load(DEBUG, ["data.image_size=16"])  # was ignored

    two = {"CPU": 2.0}
    check_fits(config.load(DEBUG, ["scaling.num_workers=2"]), two)
    check_fits(config.load(DEBUG, ["scaling.num_workers=4", "scaling.cpus_per_worker=0.5"]), two)
    with pytest.raises(ConfigError, match=r"^scaling.num_workers: 4 worker\(s\) x scaling."
                       r"cpus_per_worker = 1 CPU = 4 CPU, but the Ray started here has 2;"):
        check_fits(config.load(DEBUG, ["scaling.num_workers=4", "scaling.cpus_per_worker=1"]),
                   two)
    # an elastic run starts once its fewest fit
    check_fits(config.load(DEBUG, ["scaling.num_workers=4", "scaling.min_workers=2",
                                   "scaling.max_failures=1", "train.batch_size=36",
                                   "scaling.cpus_per_worker=1"]), two)
    with pytest.raises(ConfigError, match=r"^scaling.num_workers: 1 worker\(s\) x 1 GPU"):
        check_fits(config.load(DEBUG, ["scaling.num_workers=1", "scaling.use_gpu=true"]), two)
