"""Typed run configuration: defaults < TOML file < dotted CLI overrides.

Every section is a dataclass with one documented field per option. `load()` resolves a
file plus overrides into a `Config`; `validate()` rejects impossible values. All user
mistakes raise `ConfigError` with a one-line message naming the key, which entry points
turn into exit code 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dadh_dist.uris import SECRET_HINT, carries_secret


class ConfigError(ValueError):
    """A user mistake in the configuration (unknown key, wrong type, impossible value)."""


@dataclass
class DataConfig:
    source: str = "fashion_mnist"
    """One of: fashion_mnist, fashion_mnist_grid, cifar10, list, parquet, digits."""
    root: str = ""
    """Folder (or file) holding the data; empty = the source's default location."""
    query_per_class: int = 100
    """Query images drawn per class from all the source's images (fashion_mnist, cifar10: the
    standard protocols pool train and test); list sources take their queries from test.txt."""
    val_per_class: int = 100
    """Validation images per class, held out from queries and database."""
    database_limit: int = 0
    """Keep at most this many database images (0 = all); for quick runs."""
    image_size: int = 0
    """Side length images are decoded to for file-based sources (0 = source default)."""
    grid_count: int = 20000
    """Number of multi-label grid canvases to build (fashion_mnist_grid)."""
    seed: int = 0
    """Seed of the split (independent of the training seed)."""
    skip_bad: bool = False
    """Skip corrupt or missing images of list/Parquet sources (counted, reported); never
    structural problems (label width, truncated index files, empty classes)."""
    per_worker: bool = False
    """Parquet only: each worker reads and decodes only its own block of the database rows (and
    the query and validation splits whole), so no worker holds the whole database; the rows are
    those a whole load gives (docs/scaling.md §4)."""


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"
    """One of: small_cnn, alexnet, resnet18, resnet50, vgg16."""
    pretrained_path: str = ""
    """Local file with backbone weights (state_dict); never downloaded."""
    input_size: int = 0
    """Side the device resizes images to (0 = native for small_cnn, 224 otherwise)."""
    width: int = 16
    """Channel width of the small CNN's first layer."""
    norm: str = "group"
    """Normalisation after each small-CNN convolution: none or group (GroupNorm, per image)."""


@dataclass
class ObjectiveConfig:
    bits: int = 32
    """Code length k."""
    alpha: float = 1.0
    """Weight of L_pair (the two streams' pairwise likelihood)."""
    gamma: float = 2000.0
    """Weight of L_quant (streams pulled to the discrete codes B)."""
    eta: float = 1.0
    """Weight of L_code (asymmetric inner products against all database codes)."""
    use_pair: bool = True
    """Switch L_pair on or off."""
    use_quant: bool = True
    """Switch L_quant on or off."""
    use_code: bool = True
    """Switch L_code on or off."""
    two_streams: bool = True
    """Train both streams f and g; False = one stream (ADSH when use_pair is off)."""
    similarity: str = "soft"
    """Similarity in the squared terms: soft (similar 1, dissimilar -r) or pm1 (+1/-1)."""
    pair_norm: str = "pairs"
    """L_pair divided by its own pair count |M|·m (pairs) or by |M|·n like the others (shared)."""


@dataclass
class CodesConfig:
    init: str = "zeros"
    """Initial B before the first code step: zeros (ADSH) or random (seeded ±1)."""
    sweeps: int = 1
    """Cyclic passes over the k bit columns per code step."""
    chunk_rows: int = 8192
    """Rows of the similarity block built at once for multi-label data."""


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    """One of: adam, sgd."""
    lr_f: float = 1e-3
    """Learning rate of stream f."""
    lr_g: float = 1e-3
    """Learning rate of stream g."""
    weight_decay: float = 1e-5
    """L2 weight decay."""
    momentum: float = 0.9
    """Momentum (sgd only)."""
    schedule: str = "constant"
    """Learning-rate schedule over outer iterations: constant or cosine."""


@dataclass
class TrainConfig:
    outer_iters: int = 10
    """Outer iterations T (sample Ω, train streams, update B)."""
    inner_epochs: int = 1
    """Epochs over Ω per outer iteration (T_in)."""
    num_samples: int = 12000
    """Size m of the sample Ω drawn per outer iteration."""
    batch_size: int = 64
    """Global mini-batch size (split evenly across workers)."""
    seed: int = 0
    """Training seed (Ω, shuffling, weights, initial B)."""
    eval_every: int = 1
    """Evaluate validation mAP every this many outer iterations (0 = only at the end)."""
    checkpoint_every: int = 1
    """Write a checkpoint every this many outer iterations."""
    amp: str = "off"
    """Mixed precision on GPU: off or bf16 (training; evaluation stays fp32, as the tools)."""
    tf32: bool = True
    """On GPU: TF32 matmuls and convolutions plus cuDNN autotuning, for speed (false: full fp32
    and a fixed algorithm choice)."""
    nonfinite: str = "stop"
    """A non-finite loss on any worker: stop (with context) or skip (every worker drops that
    mini-batch, counted and reported)."""
    max_skipped: int = 10
    """With nonfinite = skip: more skipped mini-batches than this in one outer iteration stop
    the run."""


@dataclass
class ScalingConfig:
    num_workers: int = 1
    """Ray Train workers (each runs both streams under DDP); the most an elastic run uses."""
    stream_parallel: bool = False
    """Train f on one half of the workers and g on the other (DDP inside each half), so the
    streams' steps run at once; needs an even num_workers >= 2 and two streams."""
    min_workers: int = 0
    """Fewest workers an elastic run may shrink to after losing nodes (0 = fixed size)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 2.0
    """CPUs reserved per worker; also torch's thread count per worker (and in-process)."""
    use_ray: bool = True
    """Run under Ray Train; False runs the same loop in this process without Ray (1 worker)."""
    max_failures: int = 0
    """Worker-group restarts from the last checkpoint before the run fails (and, counted
    apart, worker-group starts that time out)."""
    start_timeout_s: float = 60.0
    """How long a (re)start waits for its workers' resources before it counts as a failure."""
    collective_timeout_s: int = 1800
    """Timeout of every collective; a dead peer fails the run after this long."""

    @property
    def elastic(self) -> bool:
        """True when the run may shrink: 0 < min_workers < num_workers."""
        return 0 < self.min_workers < self.num_workers


@dataclass
class EvalConfig:
    encoders: list[str] = field(default_factory=lambda: ["f", "g", "fg"])
    """Query encoders to report: f, g, fg (sign of f+g)."""
    topk: int = 0
    """Cut-off of the reported mAP@k (0 = mAP@all only)."""
    precision_at: int = 1000
    """N of the reported precision@N."""
    batch_size: int = 512
    """Images per forward pass when encoding."""


@dataclass
class LogConfig:
    run_dir: str = "runs"
    """Folder (or Ray storage URI) holding all runs."""
    name: str = ""
    """Run name; empty = derived from the config. The same name resumes. One process at a time
    trains a run (a lock in the run folder, this machine only)."""
    tensorboard: bool = True
    """Write TensorBoard events (rank 0)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    codes: CodesConfig = field(default_factory=CodesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def flat(self) -> dict:
        """Every option under its dotted key (`"objective.gamma": 200.0`)."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def with_overrides(self, overrides: list[str] | dict) -> Config:
        """A new, validated Config: this one with dotted overrides applied (the CLI's parser)."""
        return from_dict(nest({**self.flat(), **parse_overrides(overrides)}))

    def with_absolute_paths(self) -> Config:
        """Relative local data and weight paths resolved against this process's working
        directory: Ray workers and Tune trials run in directories of their own."""
        flat = self.flat()
        changed = {k: str(Path(flat[k]).expanduser().resolve()) for k in PATH_KEYS
                   if flat[k] and "://" not in flat[k] and not Path(flat[k]).is_absolute()}
        return self.with_overrides(changed) if changed else self

    def differences(self, other: Config) -> list[str]:
        """`section.key: mine -> other's` for every key that differs, log.* aside."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{s}.{k}: {a[s][k]!r} -> {b[s][k]!r}"
                for s in a if s != "log" for k in a[s] if a[s][k] != b[s][k]]

    def fingerprint(self) -> str:
        """Hash of everything that changes the result (log and the failure policy excluded)."""
        import hashlib

        d = self.to_dict()
        d.pop("log")
        for key in ("max_failures", "min_workers", "start_timeout_s", "collective_timeout_s"):
            d["scaling"].pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


ENCODERS = ("f", "g", "fg")
"""Query encoders: sign(f), sign(g), sign(f + g) (dadh_dist.encoding)."""

PATH_KEYS = ("data.root", "model.pretrained_path")
"""The keys holding local paths (or URIs) that the workers read."""

MIN_INPUT_SIDE = {"small_cnn": 4, "alexnet": 63, "vgg16": 32}
"""The smallest input side (px) each backbone's pooling leaves a pixel of (others: 1)."""

FLOAT32_SCALES = ("objective.alpha", "objective.gamma", "objective.eta", "optim.lr_f",
                  "optim.lr_g", "optim.weight_decay")
"""Keys that multiply float32 tensors (the loss, an optimiser's step)."""
FLOAT32_SCALE_MAX = 3.4028234663852886e38 / 10
"""float32's largest value over 10: Adam's first step is lr / (1 - β1) = 10·lr, and torch
refuses (with a traceback mid-run) a scalar that does not fit float32."""

CHOICES = {
    "data.source": ("fashion_mnist", "fashion_mnist_grid", "cifar10", "list", "parquet", "digits"),
    "model.backbone": ("small_cnn", "alexnet", "resnet18", "resnet50", "vgg16"),
    "model.norm": ("none", "group"),
    "objective.similarity": ("soft", "pm1"),
    "objective.pair_norm": ("pairs", "shared"),
    "codes.init": ("zeros", "random"),
    "optim.optimizer": ("adam", "sgd"),
    "optim.schedule": ("constant", "cosine"),
    "train.amp": ("off", "bf16"),
    "train.nonfinite": ("stop", "skip"),
}


def _section_types(section_cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(section_cls)


def unknown_key(key: str, name: str, known, known_label: str = "known") -> ConfigError:
    """`key: unknown key (did you mean x?); known: a, b, c`."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}; {known_label}: {', '.join(known)}")


def coerce(key: str, value, typ):
    """Check `value` against the annotated type; ints are accepted where floats are expected."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(typ) is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, list):
            return [coerce(key, v, item) for v in value]
        raise ConfigError(f"{key}: expected a list of {item.__name__} ({_list_syntax(key)}), "
                          f"got {value!r}")
    else:  # pragma: no cover - every field has one of the types above
        raise TypeError(typ)
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _list_syntax(key: str) -> str:
    """The two spellings of a list of strings, shown with the key's default as the example."""
    example = Config().flat().get(key) or ["a", "b"]
    return (f"on the command line {key}={','.join(map(str, example))}, in TOML "
            f"{_toml_value(example)}")


def _is_str_list(key: str) -> bool:
    """Whether dotted `key` names a list-of-strings field (False for a key that is none)."""
    section, _, name = key.partition(".")
    sections = {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)}
    typ = _section_types(sections[section]).get(name) if section in sections else None
    return typing.get_origin(typ) is list and typing.get_args(typ) == (str,)


def _comma_list(key: str, value):
    """A command-line value of a list-of-strings field: bare text (what is not TOML) is read as
    comma-separated members, `eval.encoders=f,fg` as the tools' `--encoders f,fg`; the TOML list
    syntax stays as it is, and so does text that starts one (`[f,fg]`: refused by `coerce`
    with the syntax that works)."""
    if isinstance(value, str) and not value.lstrip().startswith("[") and _is_str_list(key):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _parse_cli_value(raw: str):
    """Parse an override's text as a TOML value; bare words are strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply(cfg_dict: dict, key: str, value) -> None:
    """Set dotted `key` in a nested config dict, checking that the key exists and the type fits."""
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{key}: keys have the form section.field (e.g. objective.gamma)")
    section, name = parts
    section_fields = {f.name: f for f in dataclasses.fields(Config)}
    if section not in section_fields:
        raise ConfigError(f"{key}: unknown section {section!r}; known: {', '.join(section_fields)}")
    cls = section_fields[section].default_factory().__class__
    types = _section_types(cls)
    if name not in types:
        raise unknown_key(key, name, types, f"{section} has")
    cfg_dict[section][name] = coerce(key, value, types[name])


def from_dict(d: dict) -> Config:
    """Build a Config from a (possibly partial) nested dict, checking every key and type."""
    base = Config().to_dict()
    for section, values in d.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a table of keys, got {values!r}")
        for name, value in values.items():
            apply(base, f"{section}.{name}", value)
    cfg = Config(
        **{
            f.name: f.default_factory().__class__(**base[f.name])
            for f in dataclasses.fields(Config)
        }
    )
    validate(cfg)
    return cfg


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """A TOML file as a dict; a missing file or bad TOML is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {p}: invalid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {p}: not UTF-8 text (byte {e.start}); TOML files are "
                          "UTF-8") from None


def override_groups(items: list[str]) -> list[list[str]]:
    """Command-line items grouped by override: `--section.key VALUE` is two items, whatever the
    value looks like; every other item (`a.b=1`, `--a.b=1`, a trailing `--a.b`) is one."""
    groups, i = [], 0
    while i < len(items):
        n = 2 if items[i].startswith("--") and "=" not in items[i] and i + 1 < len(items) else 1
        groups.append(items[i : i + n])
        i += n
    return groups


def parse_overrides(items: list[str] | dict) -> dict:
    """The one override parser: `["a.b=1", "--a.b=1", "--a.b", "1"]` (or a dict of dotted keys)
    to `{"a.b": 1}`. Values are read as TOML (bare words are strings); a list-of-strings field's
    bare text is comma-separated (`eval.encoders=f,fg`); later items win. Keys are checked for
    shape here and against the config's sections by `with_overrides`."""
    if isinstance(items, dict):
        triples = [(key, value, key) for key, value in items.items()]
    else:
        triples = []
        for group in override_groups(items):
            item = group[0]
            if len(group) == 2:
                key, raw, given = item[2:], group[1], " ".join(group)
            elif item.startswith("--") and "=" not in item:
                raise ConfigError(f"{item[2:]}: missing value (use {item[2:]}=VALUE)")
            elif "=" not in item:
                raise ConfigError(f"{item}: overrides have the form section.key=value")
            else:
                (key, raw), given = item.removeprefix("--").split("=", 1), item
            key = key.strip()
            triples.append((key, _comma_list(key, _parse_cli_value(raw.strip())), given))
    out = {}
    for key, value, given in triples:
        if len(key.split(".")) != 2 or not all(key.split(".")):
            # the whole override: an empty key alone would show as nothing
            raise ConfigError(f"override {given!r}: keys have the form section.field (e.g. "
                              "train.outer_iters=3)")
        out[key] = value
    return out


def override_args(overrides: dict) -> list[str]:
    """Parsed overrides back to command-line arguments (`key=<TOML value>`)."""
    return [f"{k}={_toml_value(v)}" for k, v in overrides.items()]


def nest(flat: dict) -> dict:
    """Dotted keys to TOML-like tables: `{"a.b": 1}` -> `{"a": {"b": 1}}`."""
    d: dict = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        d.setdefault(section, {})[name] = value
    return d


def load(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Resolve defaults < TOML file < overrides (`["objective.gamma=200", ...]` or a dict)."""
    d: dict = read_toml(path) if path else {}
    for section, values in nest(parse_overrides(overrides or [])).items():
        d.setdefault(section, {})
        if not isinstance(d[section], dict):
            raise ConfigError(f"{section}: expected a table of keys")
        d[section].update(values)
    return from_dict(d)


def validate(cfg: Config) -> None:
    """Reject impossible values with a message naming the key and what is allowed."""
    flat = cfg.flat()
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise ConfigError(f"{key}: {value} does not fit in 64 bits")
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(allowed)}")
    for enc in cfg.eval.encoders:
        if enc not in ENCODERS:
            raise ConfigError(f"eval.encoders: {enc!r} is not one of {', '.join(ENCODERS)}")
    if not cfg.eval.encoders:
        raise ConfigError("eval.encoders: name at least one of f, g, fg")
    if not cfg.objective.two_streams and any(e != "f" for e in cfg.eval.encoders):
        raise ConfigError("eval.encoders: with objective.two_streams = false only 'f' exists")
    _validate_code_terms(cfg.objective)
    if not cfg.objective.two_streams and cfg.objective.use_pair:
        raise ConfigError(
            "objective.use_pair: L_pair ties two streams; set it false with two_streams = false"
        )
    positive = [
        "objective.bits", "train.outer_iters", "train.inner_epochs", "train.num_samples",
        "train.batch_size", "train.checkpoint_every", "scaling.num_workers", "codes.sweeps",
        "codes.chunk_rows", "eval.batch_size", "eval.precision_at", "scaling.collective_timeout_s",
        "model.width", "data.query_per_class",
    ]
    for key in positive:
        if flat[key] < 1:
            raise ConfigError(f"{key}: must be >= 1, got {flat[key]}")
    nonneg = [
        "objective.alpha", "objective.gamma", "objective.eta", "optim.weight_decay",
        "optim.momentum", "data.database_limit", "data.image_size",
        "train.eval_every", "eval.topk", "scaling.max_failures", "model.input_size",
        "data.grid_count", "data.seed", "train.seed", "train.max_skipped", "scaling.min_workers",
    ]
    for key in nonneg:
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]}")
    for key in FLOAT32_SCALES:
        if flat[key] > FLOAT32_SCALE_MAX:
            raise ConfigError(f"{key}: must be at most {FLOAT32_SCALE_MAX:.2g} (it scales float32 "
                              f"tensors), got {flat[key]:g}")
    if not cfg.optim.momentum < 1:
        raise ConfigError(f"optim.momentum: must be below 1 (a momentum of 1 or more never "
                          f"forgets a gradient: the steps grow without bound), got "
                          f"{cfg.optim.momentum:g}")
    if cfg.data.image_size and cfg.data.source not in ("list", "parquet"):
        raise ConfigError(f"data.image_size: data.source = {cfg.data.source} has images of one "
                          "side and is not decoded from files (image_size is for list and "
                          "parquet); model.input_size resizes what the network sees")
    m = cfg.model
    if m.backbone == "small_cnn" and m.pretrained_path:
        raise ConfigError(f"model.pretrained_path: small_cnn has no pretrained weights to load "
                          f"({', '.join(b for b in CHOICES['model.backbone'] if b != 'small_cnn')}"
                          " do); drop it")
    if 0 < m.input_size < MIN_INPUT_SIDE.get(m.backbone, 1):
        raise ConfigError(f"model.input_size: {m.backbone} needs at least "
                          f"{MIN_INPUT_SIDE[m.backbone]} px (got {m.input_size})")
    if cfg.data.val_per_class < 1:
        raise ConfigError(f"data.val_per_class: must be >= 1, got {cfg.data.val_per_class}")
    for key in ("optim.lr_f", "optim.lr_g", "scaling.cpus_per_worker",
                "scaling.start_timeout_s"):
        if not flat[key] > 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]}")
    _validate_worker_range(cfg)
    _validate_stream_parallel(cfg)
    _validate_run_dir(cfg.log.run_dir)
    name = cfg.log.name
    if name and (any(c in name for c in '/\\?#') or name.startswith(".")):
        raise ConfigError(f"log.name: {name!r} must be one folder name (no '/', '\\', '?', '#', "
                          "no leading '.'); put groups of runs under log.run_dir instead")
    if cfg.train.batch_size > cfg.train.num_samples:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} exceeds "
            f"train.num_samples={cfg.train.num_samples}"
        )
    if cfg.data.per_worker and cfg.data.source != "parquet":
        raise ConfigError(f"data.per_worker: reads Parquet shards only; data.source is "
                          f"{cfg.data.source} (set it false: that source is read whole)")
    if not cfg.scaling.use_ray and cfg.scaling.num_workers != 1:
        raise ConfigError("scaling.num_workers: must be 1 with scaling.use_ray = false")
    if not cfg.scaling.use_ray and cfg.scaling.use_gpu:
        raise ConfigError("scaling.use_gpu: needs scaling.use_ray = true (a run without Ray "
                          "trains on the CPU)")


def _validate_code_terms(o: ObjectiveConfig) -> None:
    """The code step learns B from L_quant and L_code only (docs/design.md §2: Q's two parts);
    a term switched off and one weighted 0 are the same (objective.LossWeights)."""
    off = {}
    for term, switch, weight in (("L_quant", "use_quant", "gamma"), ("L_code", "use_code", "eta")):
        if not getattr(o, switch):
            off[f"objective.{switch}"] = f"{term}: objective.{switch} = false"
        elif getattr(o, weight) == 0:
            off[f"objective.{weight}"] = f"{term}: objective.{weight} = 0"
    if len(off) < 2:
        return
    weights = [k for k in off if not k.split(".")[1].startswith("use_")]
    key = weights[0] if weights else "objective.use_code"
    raise ConfigError(f"{key}: B is learned from L_quant and L_code, and both are off "
                      f"({'; '.join(off.values())}); keep one on with a weight above 0")


def _validate_run_dir(run_dir: str) -> None:
    """A URI may name a user (`hdfs://user@host`) but not carry a secret: the run's config is
    saved with every run, checkpoint and codes file, and a `key:secret@` would travel with it."""
    if carries_secret(run_dir):
        raise ConfigError(f"log.run_dir: the URI carries a secret (user:secret@); {SECRET_HINT}")


def _validate_worker_range(cfg: Config) -> None:
    """An elastic run may use any worker count in min_workers..num_workers; the global batch
    must split evenly over each of them (docs/design.md §3: no padded or repeated rows)."""
    s, b = cfg.scaling, cfg.train.batch_size
    if s.min_workers > s.num_workers:
        raise ConfigError(
            f"scaling.min_workers: must be between 1 and scaling.num_workers={s.num_workers} "
            f"(0 = fixed size), got {s.min_workers}")
    if s.elastic:
        if not s.use_ray:
            raise ConfigError("scaling.min_workers: an elastic worker range needs "
                              "scaling.use_ray = true; use 0 without Ray")
        if s.max_failures < 1:
            raise ConfigError("scaling.max_failures: an elastic run (scaling.min_workers > 0) "
                              "restarts after losing workers; must be >= 1, got 0")
    counts = range(s.min_workers or s.num_workers, s.num_workers + 1)
    bad = [w for w in counts if b % w]
    if not bad:
        return
    if len(counts) == 1:
        raise ConfigError(
            f"train.batch_size: {b} is not divisible by scaling.num_workers={s.num_workers}; "
            f"use a multiple of {s.num_workers}")
    raise ConfigError(
        f"train.batch_size: {b} is not divisible by {bad[0]} workers, a size the elastic range "
        f"scaling.min_workers..num_workers = {counts.start}..{counts.stop - 1} allows; use a "
        f"multiple of {math.lcm(*counts)}")


def _validate_stream_parallel(cfg: Config) -> None:
    """f and g on two worker groups of W/2 each (docs/design.md §3, stream-parallel)."""
    s = cfg.scaling
    if not s.stream_parallel:
        return
    if not cfg.objective.two_streams:
        raise ConfigError("scaling.stream_parallel: needs two streams "
                          "(objective.two_streams = true)")
    if s.num_workers < 2 or s.num_workers % 2:
        raise ConfigError("scaling.stream_parallel: needs an even scaling.num_workers >= 2 "
                          f"(one half per stream), got {s.num_workers}")
    if s.elastic:
        raise ConfigError("scaling.stream_parallel: an elastic worker range (scaling.min_workers"
                          " > 0) could give an odd worker count; use a fixed size")
    half = s.num_workers // 2
    if cfg.train.batch_size % half:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is not divisible by the {half} worker(s) "
            f"of each stream's group; use a multiple of {half}")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps_toml(d: dict) -> str:
    """Write a two-level dict (sections of scalars and lists) as TOML."""
    out = []
    for section, values in d.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        out.append("")
    return "\n".join(out)
