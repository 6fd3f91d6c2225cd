"""The whole run as one typed config: pydantic v2 models, loaded from YAML plus `key.sub=value` overrides.

Every check happens here, in `load`, before Ray starts: unknown keys, wrong types, impossible values
and dangling stage references fail with the field path and what is allowed.

A run is an ordered chain of named stages. A `train` stage trains from scratch or from `init` (an
earlier stage's name or a checkpoint path); its methods' sections (oodlab.methods: `forget`, UM's loss floor;
`mask`, UMAP; `background`; `oe`; `logitnorm`) switch the training-time methods on and combine. An `estimate`
stage measures the forgetting threshold; an `eval` stage scores a checkpoint with every post-hoc score.

Configs mean what they say: a `mask` without `forget` is refused unless `mask.plain_edge_popup` says so; a
stage that uses an estimate's threshold starts from the checkpoint the estimate measured; an epoch count
searched under ASHA needs the stage's `schedule_epochs` (one cosine schedule for every trial).

Hostile input is refused in moments: YAML through `oodlab.bounded_yaml`, every size and count bounded
(`oodlab.limits`), floats finite. timm and torch (seconds to import) are imported by the two checks that need them
(model.name, the eval scores), so a document refused before those is refused without them.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

from pydantic import (BaseModel, Field, PlainSerializer, PlainValidator, ValidationError, create_model, field_validator,
                      model_validator)

from oodlab import bounded_yaml
from oodlab.limits import (MAX_BATCH, MAX_CLASSES, MAX_CPUS, MAX_EPOCHS, MAX_FAILURES, MAX_KNN_BANK, MAX_NAME,
                           MAX_SAMPLES, MAX_SEED, MAX_THREADS, MAX_TRIALS, MAX_WORKERS, bank_cost, batch_cost, count)
from oodlab.methods import registered
from oodlab.section import Section
from oodlab.storage import StoragePath, is_uri, location

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
# Sizes and counts, each bounded (oodlab.limits: the message says what a value over the bound would take)
Epochs = count(MAX_EPOCHS, "epochs")
ZeroOrMoreEpochs = count(MAX_EPOCHS, "epochs", low=0)
BatchSize = count(MAX_BATCH, "images per batch", batch_cost)
Threads = count(MAX_THREADS, "loader threads")
Classes = count(MAX_CLASSES, "classes")
BankSize = count(MAX_KNN_BANK, "kNN bank features", bank_cost)
Workers = count(MAX_WORKERS, "Ray Train workers")
Retries = count(MAX_FAILURES, "retries", low=0)
Trials = count(MAX_TRIALS, "trials")
Samples = count(MAX_SAMPLES, "samples")
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=MAX_NAME)]  # it names folders


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class ConfigError(ValueError):
    """A config problem, with the field path and the fix in the message."""


class DataConfig(Section):
    benchmark: str = "fmnist-demo"  # a built-in benchmark's name or the path of a benchmark YAML
    root: Path = Path(".oodlab/data")  # where the benchmark's .beton files are (the demo writes them here)
    batch_size: BatchSize = 128  # global: split evenly over the Ray workers
    eval_batch_size: BatchSize = 256  # global
    loader_threads: Threads = 1  # FFCV threads per Ray worker; at most the worker's CPUs
    os_cache: bool = True  # FFCV: read through the OS page cache (True) or its own process cache
    order: Literal["random", "quasi_random"] = "random"  # train order; quasi_random is single-process only
    # train on a fixed subset of id_train: this many samples, the first of a permutation seeded 0 (the same for every
    # seed); the estimate stage and the kNN / Mahalanobis bank use the same subset. None: all of id_train
    train_limit: Samples | None = None


class ModelConfig(Section):
    name: str = "resnet18_cifar"  # any timm model name (CIFAR nets registered by oodlab.models)
    pretrained: bool = False  # timm's pretrained weights (downloads: cluster only)
    weights_saw_id_train: bool = True  # the pretrained weights were trained on the benchmark's id.train (ImageNet)
    kwargs: dict[str, Any] = {}  # passed to timm.create_model
    channels_last: bool = False

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from oodlab.models import check_model_name  # (timm: see the module docstring)

        check_model_name(name)
        return name


class TrainStageBase(Section):
    """A train stage's schedule; its methods' sections (`forget`, `mask`, `background`, `oe`, `logitnorm`, ...) are
    added from the registry of oodlab.methods, each optional (see `TrainStage`)."""

    kind: Literal["train"] = "train"
    init: str | None = None  # None: from scratch; an earlier stage's name; or a checkpoint (file or directory)
    epochs: Epochs = 10
    schedule_epochs: Epochs | None = None  # the cosine schedule spans this many epochs (default: epochs)
    lr: PositiveFloat = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = True
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    eval_every: Epochs = 1  # evaluate OOD metrics every k epochs (and always after the last)

    @model_validator(mode="after")
    def _consistent_methods(self) -> TrainStageBase:
        if self.schedule_epochs is not None and self.schedule_epochs < self.epochs:
            raise ValueError(f"schedule_epochs: the schedule must span at least the {self.epochs} trained epochs "
                             "(training stops at `epochs`); raise schedule_epochs or drop it")
        for name, method in registered().items():
            if getattr(self, name, None) is not None:
                method.check(self)
        return self


# Every registered training method's section, optional, under its name (oodlab.methods: one module per method).
TrainStage = create_model("TrainStage", __base__=TrainStageBase, __module__=__name__,
                          **{name: (Optional[m.section], None) for name, m in registered().items()})


class EstimateStage(Section):
    """Measure the forgetting threshold: mean train CE of the `init` model under a random mask."""

    kind: Literal["estimate"]
    init: str
    mask_ratio: Fraction = 0.035
    augment: bool = True  # train-time augmentation, as the spec measures it


class EvalStage(Section):
    """Score the `init` model with the final score set (cfg.eval.final_scores)."""

    kind: Literal["eval"]
    init: str


Stage = Annotated[Union[TrainStage, EstimateStage, EvalStage], Field(discriminator="kind")]


class EvalConfig(Section):
    scores: list[str] = ["msp", "energy"]  # cheap per-epoch subset
    final_scores: list[str] = ["msp", "maxlogit", "energy", "gen", "odin", "react", "ash", "scale", "knn", "nnguide",
                               "fdbd", "vim", "mahalanobis", "featnorm"]
    params: dict[str, dict[str, Any]] = {}  # per-score parameters, e.g. {odin: {temperature: 1000}}
    knn_bank_size: BankSize = 50_000  # ID-train features kept for the scores fitted on them (evenly subsampled)
    select: str = "energy"  # the score whose OOD-validation fpr95 marks the best epoch (must be in scores)
    # the best epoch is chosen among those whose ID validation accuracy is within this many points of the best
    best_epoch_max_acc_drop: Annotated[float, Field(ge=0)] = 5.0

    @field_validator("scores", "final_scores", "params")
    @classmethod
    def _known_scores(cls, value: list[str] | dict[str, Any]) -> list[str] | dict[str, Any]:
        from oodlab.scores import available_scores, validate_scores  # (torch: see the module docstring)

        unknown = [name for name in value if name not in available_scores()]
        if unknown:
            raise ValueError(f"unknown score(s) {unknown}; available: {', '.join(available_scores())}")
        if isinstance(value, dict):
            validate_scores([], value)  # each score's parameter names
        return value

    @model_validator(mode="after")
    def _select_is_evaluated(self) -> EvalConfig:
        if self.select not in self.scores or self.select not in self.final_scores:
            raise ValueError(f"select: '{self.select}' must be in both scores and final_scores")
        return self


class RayConfig(Section):
    address: str | None = None  # None: a local Ray instance; "auto" or "ray://host:10001" for a cluster
    num_workers: Workers = 2
    cpus_per_worker: Annotated[float, Field(gt=0, le=MAX_CPUS)] = 1.0
    use_gpu: bool = False  # NCCL + one GPU per worker (gloo on CPU)
    amp: bool = False  # bf16 autocast on GPU
    # checkpoints, pipeline and sweep state, Ray's run state: a local folder (shared storage on a cluster) or a
    # URI pyarrow opens (s3://bucket/path, gs://...; endpoint and credentials from the environment)
    storage_path: Annotated[StoragePath, PlainValidator(location), PlainSerializer(str, return_type=str)] = \
        Path(".oodlab/runs")
    # worker-group restarts from the last checkpoint after a worker error. 1 survives one crash (a worker killed
    # by the OOM killer or a signal) while a bug costs one retry; node preemptions are retried without limit by
    # Ray (FailureConfig.max_preemption_failures), and a NaN loss is never retried
    max_failures: Retries = 1
    # custom resources each worker also asks for, e.g. {train_slot: 1} with one train_slot per node puts one
    # worker on each node (CPUs and GPUs come from cpus_per_worker and use_gpu)
    resources_per_worker: dict[str, PositiveFloat] = {}

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, resources: dict[str, float]) -> dict[str, float]:
        if {"CPU", "GPU"} & set(resources):
            raise ValueError("CPU and GPU come from ray.cpus_per_worker and ray.use_gpu; list custom resources only")
        return resources


def _tracking_uri_from_env() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class MlflowConfig(Section):
    # unset: $MLFLOW_TRACKING_URI, else the sqlite default; relative sqlite paths resolve against the working
    # directory. Credentials never go here: MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN in the environment.
    tracking_uri: str = Field(default_factory=_tracking_uri_from_env)

    @field_validator("tracking_uri", mode="before")
    @classmethod
    def _null_means_unset(cls, uri: str | None) -> str:
        return _tracking_uri_from_env() if uri is None else uri
    experiment: str = "oodlab"


class CheckpointConfig(Section):
    keep_last: Epochs | None = None  # None keeps every epoch's checkpoint (the per-epoch OOD curve)


class Dist(Section):
    """One search dimension: uniform / loguniform over [low, high], randint over the integers low..high
    (both included), or choice (sampled) / grid (every value, crossed with num_samples) over `values`."""

    dist: Literal["uniform", "loguniform", "randint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Dist:
        if self.dist in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"values: {self.dist} needs a non-empty list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"high: {self.dist} needs low < high")
        elif self.dist == "loguniform" and self.low <= 0:
            raise ValueError("low: loguniform needs low > 0")
        elif self.dist == "randint" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("randint: low and high must be whole numbers")
        elif self.dist == "randint" and max(abs(self.low), abs(self.high)) > 2**53:
            raise ValueError("randint: low and high must lie within +-2^53 (whole numbers a float holds exactly)")
        return self

    def upper(self) -> float | None:
        """The largest number this dimension can take (None if it lists no numbers)."""
        if self.values is None:
            return self.high
        return max((v for v in self.values if isinstance(v, (int, float)) and not isinstance(v, bool)), default=None)


class SearchConfig(Section):
    """A Ray Tune sweep: each trial runs this config's stages with the sampled overrides.

    The objective may only read OOD-validation metrics (`ood/<score>/val/<metric>`) and ID validation
    accuracy: test OOD sets never influence which trial wins.
    """

    space: dict[str, Dist]  # override path (e.g. stages.um.forget.threshold) -> distribution
    num_samples: Trials = 4
    searcher: Literal["random", "optuna"] = "random"  # random also expands grid dimensions; optuna (TPE) takes none
    scheduler: Literal["asha", "fifo"] = "asha"
    metric: str = "ood/energy/val/fpr95"
    mode: Literal["min", "max"] = "min"
    max_id_acc_drop: Annotated[float, Field(ge=0)] | None = None  # percent points of ID val accuracy vs `init`
    stage: str | None = None  # the stage whose per-epoch results drive ASHA (default: the last train stage)
    cpus_per_trial_worker: PositiveFloat | None = None  # default: ray.cpus_per_worker

    @field_validator("metric")
    @classmethod
    def _validation_only(cls, metric: str) -> str:
        parts = metric.split("/")
        if metric != "id_val_acc" and not (len(parts) == 4 and parts[0] == "ood" and parts[2] == "val"):
            raise ValueError(
                f"'{metric}' is not a validation metric; use ood/<score>/val/<metric> or id_val_acc "
                "(tuning on test OOD sets is a leak)"
            )
        return metric

    @model_validator(mode="after")
    def _grid_needs_random(self) -> SearchConfig:
        grids = [key for key, d in self.space.items() if d.dist == "grid"]
        if grids and self.searcher == "optuna":
            raise ValueError(f"space: grid dimensions {grids} need searcher: random; with optuna use dist: choice")
        return self


class Config(Section):
    name: Name = "run"
    seed: Annotated[int, Field(ge=-MAX_SEED, le=MAX_SEED)] = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)  # read at load time: $MLFLOW_TRACKING_URI
    checkpoint: CheckpointConfig = CheckpointConfig()
    stages: dict[Name, Stage] = {"train": TrainStage()}  # a stage's name names its checkpoint folders
    search: SearchConfig | None = None

    @field_validator("stages", mode="before")
    @classmethod
    def _default_kind(cls, stages: Any) -> Any:
        if isinstance(stages, dict):
            return {n: {"kind": "train", **s} if isinstance(s, dict) and "kind" not in s else s for n, s in stages.items()}
        return stages

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if not self.stages:
            raise ValueError("stages: at least one stage is needed, e.g. stages: {train: {epochs: 10}}")
        if self.data.batch_size < self.ray.num_workers:
            raise ValueError(f"data.batch_size ({self.data.batch_size}) must be >= ray.num_workers ({self.ray.num_workers})")
        if self.data.loader_threads > max(1, int(self.ray.cpus_per_worker)):
            raise ValueError(
                f"data.loader_threads ({self.data.loader_threads}) exceeds ray.cpus_per_worker "
                f"({self.ray.cpus_per_worker}); lower it or give workers more CPUs"
            )
        if self.data.order == "quasi_random" and self.ray.num_workers > 1:
            raise ValueError("data.order: quasi_random is not available with several workers; use random")
        if self.ray.amp and not self.ray.use_gpu:
            raise ValueError("ray.amp: bf16 autocast is for GPUs; set ray.use_gpu=true or ray.amp=false")
        earlier: dict[str, str] = {}
        for name, stage in self.stages.items():
            _check_init(name, stage.init, earlier)
            forget = getattr(stage, "forget", None)
            if forget is not None and forget.estimate is not None:
                if earlier.get(forget.estimate) != "estimate":
                    known = [n for n, k in earlier.items() if k == "estimate"]
                    raise ValueError(f"stages.{name}.forget.estimate: '{forget.estimate}' is not an earlier estimate "
                                     f"stage (earlier: {known})")
                _check_same_start(name, stage.init, forget.estimate, self.stages)
            earlier[name] = stage.kind
        if self.search is not None:
            if self.search.stage is not None and self.search.stage not in self.train_stages():
                raise ValueError(f"search.stage: '{self.search.stage}' is not a train stage ({list(self.train_stages())})")
            if self.search.scheduler == "asha":
                _check_asha_epochs(self.search.space, self.train_stages())
        return self

    def train_stages(self) -> dict[str, TrainStage]:
        return {n: s for n, s in self.stages.items() if isinstance(s, TrainStage)}


def _check_init(name: str, init: str | None, earlier: dict[str, str]) -> None:
    if init is None or init in earlier and earlier[init] == "train":
        return
    if init in earlier:
        raise ValueError(f"stages.{name}.init: '{init}' is an {earlier[init]} stage; name a train stage or a checkpoint file")
    if is_uri(init):  # read, and so checked, with the storage's credentials before the run (pipeline.preflight)
        location(init)
        return
    if not Path(init).expanduser().exists():  # a checkpoint file, or a checkpoint directory holding model.pt
        trains = [n for n, k in earlier.items() if k == "train"]
        raise ValueError(
            f"stages.{name}.init: '{init}' is neither an earlier train stage ({trains}) nor an existing "
            "checkpoint file; a missing checkpoint is an error, never a silent random init"
        )


def _check_same_start(name: str, init: str | None, estimate: str, stages: dict[str, Any]) -> None:
    """The threshold a stage floors its loss at must be measured on the model that stage starts from."""
    estimate_init = stages[estimate].init
    if init is not None and _checkpoint_key(init, stages) == _checkpoint_key(estimate_init, stages):
        return
    raise ValueError(
        f"stages.{name}.init: {init!r} differs from stages.{estimate}.init {estimate_init!r}; the forgetting "
        f"threshold (stages.{name}.forget.estimate: {estimate}) must be measured on the checkpoint this stage "
        f"starts from: give stages.{name}.init and stages.{estimate}.init the same stage or file"
    )


def _checkpoint_key(init: str, stages: dict[str, Any]) -> str:
    """A stage name as is; a checkpoint path absolute, a checkpoint directory as the model.pt inside it."""
    if init in stages:
        return init
    path = Path(init).expanduser().resolve()
    return str(path / "model.pt" if path.is_dir() else path)


def _check_asha_epochs(space: dict[str, Dist], stages: dict[str, TrainStage]) -> None:
    """ASHA compares trials at epochs 1, 2, 4, ...: every trial must be at the same point of one schedule there."""
    for key, dist in space.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "stages" or parts[2] != "epochs" or parts[1] not in stages:
            continue
        most, schedule = dist.upper(), stages[parts[1]].schedule_epochs
        if most is not None and (schedule is None or schedule < most):
            raise ValueError(
                f"search.space.{key}: searching an epoch count under search.scheduler: asha compares trials at "
                "epochs 1, 2, 4, ... while each trial's cosine schedule spans its own epochs (a short trial reaches "
                f"a rung at a lower learning rate); set stages.{parts[1]}.schedule_epochs: {most:.0f} (the space's "
                f"maximum; now {schedule}) so every trial follows one schedule and stops at its own epochs, "
                "or use search.scheduler: fifo"
            )


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Make every path absolute: Ray workers and MLflow run in other working directories."""
    cfg.data.root = (base / cfg.data.root).expanduser().resolve()
    if cfg.data.benchmark.endswith((".yaml", ".yml")):
        cfg.data.benchmark = str((base / cfg.data.benchmark).expanduser().resolve())
    if isinstance(cfg.ray.storage_path, Path):
        cfg.ray.storage_path = (base / cfg.ray.storage_path).expanduser().resolve()
    uri = cfg.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        cfg.mlflow.tracking_uri = "sqlite:///" + str((base / uri.removeprefix("sqlite:///")).resolve())
    for stage in cfg.stages.values():
        if stage.init and stage.init not in cfg.stages and not is_uri(stage.init):
            stage.init = str(Path(stage.init).expanduser().resolve())
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key.sub=value, e.g. stages.train.epochs=3")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        try:
            node[leaf] = bounded_yaml.parse(value, f"override '{key}'")
        except bounded_yaml.YamlError as err:
            raise ConfigError(str(err)) from None
    return raw


def load(path: str | Path | None = None, overrides: list[str] | None = None, base: Path | None = None) -> Config:
    """Read YAML (or start from defaults), apply overrides, validate, resolve paths against `base` (cwd)."""
    return validate(read(path, overrides), base or Path.cwd())


def read(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw config: the YAML file (or nothing: defaults) with the overrides applied; not validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = bounded_yaml.read(path) or {}
        except bounded_yaml.YamlError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, stages, ...)")
    return apply_overrides(raw, overrides or [])


def validate(raw: dict[str, Any], base: Path) -> Config:
    """Validate a raw dict into a Config, turning pydantic's errors into one readable ConfigError."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid config:\n" + describe_errors(err, Config)) from None
    return _resolve_paths(cfg, base)


LISTED_ERRORS = 20  # a document with more problems lists these many (the first, in document order)
SHOWN_INPUT = 80  # characters of a bad value quoted in its error line


def describe_errors(err: ValidationError, root: type[BaseModel]) -> str:
    """pydantic's errors for a document of type `root`, one readable line each (field path, problem, fix)."""
    errors = err.errors()
    lines = [_describe(e, root) for e in errors[:LISTED_ERRORS]]
    if len(errors) > LISTED_ERRORS:
        lines.append(f"  ... and {len(errors) - LISTED_ERRORS} more problems of the same document")
    return "\n".join(lines)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain, YAML-ready dict (paths as strings)."""
    return cfg.model_dump(mode="json")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the config as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Where and how a run executes, not what it computes: a rerun may change these and still resume.
PLACEMENT_KEYS = ("ray.address", "ray.max_failures", "data.root", "data.loader_threads", "data.os_cache")


def check_unchanged(kind: str, name: str, now: dict[str, Any], then: dict[str, Any]) -> None:
    """Refuse to resume run `name` under another config: ConfigError listing every changed key (flattened
    configs; PLACEMENT_KEYS may change). `then` may be nested, as sweep.json kept it before it was flattened."""
    then = flatten(then)
    changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k) and k not in PLACEMENT_KEYS)
    if changed:
        raise ConfigError(f"{kind} '{name}' was started with another config (differs in: {', '.join(changed)}); "
                          "rerun with --restart to start it anew, or give it another name")


_STAGE_MODELS: dict[str, type[BaseModel]] = {"train": TrainStage, "estimate": EstimateStage, "eval": EvalStage}


def _describe(error: dict[str, Any], root: type[BaseModel]) -> str:
    loc = list(error["loc"])
    section = root
    if root is Config and loc[:1] == ["stages"] and len(loc) > 2 and loc[2] in _STAGE_MODELS:
        section = _STAGE_MODELS[loc.pop(2)]  # pydantic puts the stage kind in the path; users never write it
        inner = loc[2:]
    else:
        inner = loc
    where = ".".join(str(p) for p in loc) or "config"
    if error["type"] == "extra_forbidden":
        allowed = list(_section_at(section, inner[:-1]).model_fields)
        close = difflib.get_close_matches(str(inner[-1]), allowed, n=1)
        hint = f" did you mean '{close[0]}'?" if close else ""
        return f"  {where}: unknown key;{hint} allowed keys: {', '.join(allowed)}"
    if error["type"] == "union_tag_invalid":
        return f"  {where}: unknown stage kind; allowed: {', '.join(_STAGE_MODELS)}"
    msg = error["msg"].removeprefix("Value error, ").removeprefix(f"{where}: ")
    field, sep, rest = msg.partition(": ")
    if sep and where != "config" and re.fullmatch(r"[A-Za-z_][\w.]*", field):  # a section's check naming its field
        where, msg = f"{where}.{field}", rest
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) and error["type"] == "value_error" else f" (got {_short(got)})"
    return f"  {msg}" if where == "config" else f"  {where}: {msg}{shown}"


def _short(value: Any) -> str:
    """repr(value), cut to SHOWN_INPUT characters."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits, or a container holding one
        return "a number too long to print"
    return text if len(text) <= SHOWN_INPUT else f"{text[:SHOWN_INPUT]}... ({len(text):,} characters)"


def _section_at(model: type[BaseModel], path: list[Any]) -> type[BaseModel]:
    """The section model reached by following field names from `model`."""
    for part in path:
        field = model.model_fields.get(str(part))
        sub = _section_type(field.annotation) if field else None
        if sub is None:
            break
        model = sub
    return model


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None
