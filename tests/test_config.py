"""Config validation: every bad input fails before Ray starts, naming the field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from oodlab import config

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def load_demo(*overrides: str) -> config.Config:
    return config.load(DEMO, list(overrides))


def test_example_configs_load():
    for path in sorted(DEMO.parent.glob("*.yaml")):
        if "init: /shared/" in path.read_text():  # starts from a cluster checkpoint: absent here, and an error
            with pytest.raises(config.ConfigError, match="nor an existing checkpoint file"):
                config.load(path)
        else:
            assert config.load(path).stages, path


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batchsize=3", "data.batchsize: unknown key; did you mean 'batch_size'? allowed keys: benchmark, root,"),
        ("stages.um.lrr=0.1", "stages.um.lrr: unknown key; did you mean 'lr'?"),
        ("stages.um.forget.thresh=1", "stages.um.forget.thresh: unknown key; did you mean 'threshold'?"),
        ("stages.um.lr=abc", "stages.um.lr: Input should be a valid number"),
        ("stages.um.lr=-1", "stages.um.lr: Input should be greater than 0"),
        ("stages.umap.mask.mask_ratio=1.0", "stages.umap.mask.mask_ratio: Input should be less than 1"),
        ("stages.estimate.kind=pretrain", "stages.estimate: unknown stage kind; allowed: train, estimate, eval"),
        ("stages.background.background.select=random", "Input should be 'lowest', 'threshold' or 'topk'"),
        ("model.name=resnet18_cifr", "model.name: unknown model 'resnet18_cifr'. Did you mean: resnet18_cifar"),
        ("eval.scores=[msp,energi]", "eval.scores: unknown score(s) ['energi']; available: ash, energy,"),
        ("eval.select=knn", "eval.select: 'knn' must be in both scores and final_scores"),
        ("stages.um.init=nope.pt", "stages.um.init: 'nope.pt' is neither an earlier train stage (['baseline'])"),
        ("stages.um.init=estimate", "stages.um.init: 'estimate' is an estimate stage"),
        ("stages.um.forget.estimate=baseline", "stages.um.forget.estimate: 'baseline' is not an earlier estimate stage"),
        ("stages.um.forget.threshold=0.2", "set exactly one of threshold (a number) or estimate"),
        ("ray.amp=true", "ray.amp: bf16 autocast is for GPUs; set ray.use_gpu=true"),
        ("data.loader_threads=4", "data.loader_threads (4) exceeds ray.cpus_per_worker (1.0)"),
        ("data.batch_size=1", "data.batch_size (1) must be >= ray.num_workers (2)"),
        ("name=a/b", "name: String should match pattern"),
        ("search={space: {lr: {dist: loguniform, low: 0, high: 1}}}", "search.space.lr.low: loguniform needs low > 0"),
        ("search={space: {}, metric: ood/energy/all/fpr95}", "is not a validation metric"),
    ],
)
def test_bad_input_names_the_field_and_the_fix(override, expected):
    with pytest.raises(config.ConfigError) as err:
        load_demo(override)
    assert expected in str(err.value)


def test_malformed_override_and_missing_file():
    with pytest.raises(config.ConfigError, match="expected key.sub=value"):
        load_demo("stages.um.lr")
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load("no/such.yaml")


def test_overrides_are_yaml_typed_and_stage_kind_defaults_to_train():
    cfg = load_demo("stages.um.lr=0.5", "eval.scores=[msp, energy, knn]", "stages.extra={init: baseline, epochs: 1}")
    assert cfg.stages["um"].lr == 0.5
    assert cfg.eval.scores == ["msp", "energy", "knn"]
    assert cfg.stages["extra"].kind == "train" and list(cfg.stages)[-1] == "extra"


def test_paths_resolve_against_the_working_directory(tmp_path):
    cfg = config.load(DEMO, base=tmp_path)
    assert cfg.data.root == tmp_path / ".oodlab" / "data"
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/.oodlab/mlflow.db"
    assert cfg.ray.storage_path.is_absolute()


def test_checkpoint_init_must_exist_and_resolves(tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")
    cfg = load_demo(f"stages.um.init={ckpt}")
    assert cfg.stages["um"].init == str(ckpt)


def test_flatten_gives_mlflow_params():
    flat = config.flatten(config.to_dict(load_demo()))
    assert flat["stages.um.forget.estimate"] == "estimate"
    assert flat["ray.num_workers"] == 2
    assert flat["model.kwargs.zero_init_last"] is False
