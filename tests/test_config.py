"""Config validation: every bad input fails before Ray starts, naming the field and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from oodlab import config
from oodlab.methods import TrainMethod

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
EPOCHS_SEARCH = "search={space: {stages.um.epochs: {dist: randint, low: 2, high: 6}}}"  # under ASHA, the default


def load_demo(*overrides: str) -> config.Config:
    return config.load(DEMO, list(overrides))


def test_example_configs_load():
    for path in sorted(DEMO.parent.glob("*.yaml")):
        if "init: /shared/" in path.read_text():  # starts from a cluster checkpoint: absent here, and an error
            with pytest.raises(config.ConfigError, match="nor an existing checkpoint file"):
                config.load(path)
        else:
            assert config.load(path).stages, path


def test_shipped_recipes_validate_without_their_data_and_match_the_reference(tmp_path):
    """Every config loads with its cluster checkpoint stood in and no data at all: validation never reads data."""
    start, root = tmp_path / "model.pt", tmp_path / "no-data"
    start.write_bytes(b"")
    loaded = {}
    for path in sorted(DEMO.parent.glob("*.yaml")):
        stages = yaml.safe_load(path.read_text())["stages"]
        cluster = [f"stages.{n}.init={start}" for n, s in stages.items() if str(s.get("init")).startswith("/shared/")]
        loaded[path.stem] = config.load(path, [f"data.root={root}", *cluster])
    assert not root.exists()
    for name, cfg in loaded.items():  # UMAP as the reference trains it: under the loss floor, weight decay 1e-4
        for stage in cfg.train_stages().values():
            if stage.mask is not None:
                assert stage.forget is not None and stage.weight_decay == 1e-4, name
    umap = loaded["imagenet1k_resnet50_umap"]  # the paper's ImageNet number: ODIN + UMAP on ResNet-50
    assert umap.model.name == "resnet50" and "odin" in umap.eval.final_scores
    assert umap.stages["umap"].mask.mask_ratio == 0.2 and not umap.stages["umap"].mask.train_weights
    assert umap.stages["estimate"].mask_ratio == 0.035 and umap.stages["umap"].forget.estimate == "estimate"


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
        ("eval.params={gen: {gama: 0.5}}", "eval.params: score 'gen' got unknown parameter(s) ['gama']; accepted "
                                           "parameters: ['gamma', 'top_m']"),
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
        # an epoch count searched under ASHA needs one schedule for every trial, as long as the longest
        (EPOCHS_SEARCH, "search.space.stages.um.epochs: searching an epoch count under search.scheduler: asha "
                        "compares trials at epochs 1, 2, 4, ... while each trial's cosine schedule spans its own "
                        "epochs (a short trial reaches a rung at a lower learning rate); set "
                        "stages.um.schedule_epochs: 6 (the space's maximum; now None)"),
        ((EPOCHS_SEARCH, "stages.um.schedule_epochs=5"), "set stages.um.schedule_epochs: 6 (the space's maximum; now 5)"),
        (("stages.um.epochs=3", "stages.um.schedule_epochs=2"),
         "stages.um.schedule_epochs: the schedule must span at least the 3 trained epochs"),
        # a mask without forget is plain edge-popup, not UMAP
        ("stages.umap.forget=null", "stages.umap.mask: UMAP needs `forget` (the loss floor) in the same stage, else "
                                    "this trains plain edge-popup; add forget: {estimate: <estimate stage>} or "
                                    "{threshold: <l_hat>}, or set mask.plain_edge_popup: true"),
        ("stages.umap.mask.plain_edge_popup=true",
         "stages.umap.mask.plain_edge_popup: true means no loss floor, but `forget` is set; drop one of them"),
        # the threshold is measured on the checkpoint the stage that uses it starts from
        ("stages.um.init=null", "stages.um.init: None differs from stages.estimate.init 'baseline'; the forgetting "
                                "threshold (stages.um.forget.estimate: estimate) must be measured on the checkpoint "
                                "this stage starts from: give stages.um.init and stages.estimate.init the same"),
    ],
)
def test_bad_input_names_the_field_and_the_fix(override, expected):
    with pytest.raises(config.ConfigError) as err:
        load_demo(*([override] if isinstance(override, str) else override))
    assert expected in str(err.value)


def test_the_escape_hatches_load():
    searched = load_demo(EPOCHS_SEARCH, "stages.um.schedule_epochs=6")  # one 6-epoch schedule for every trial
    assert searched.stages["um"].schedule_epochs == 6 and searched.search.space["stages.um.epochs"].upper() == 6
    assert load_demo(EPOCHS_SEARCH, "search.scheduler=fifo").search.scheduler == "fifo"  # no rungs to compare at
    plain = load_demo("stages.umap.forget=null", "stages.umap.mask.plain_edge_popup=true")
    assert TrainMethod(plain.stages["umap"], threshold=None).tag == "edge-popup"
    assert TrainMethod(load_demo().stages["umap"], threshold=0.1).tag == "umap"


def test_estimate_and_its_user_may_name_one_checkpoint_two_ways(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "model.pt").write_bytes(b"")
    same = [f"stages.estimate.init={first}", f"stages.um.init={first / 'model.pt'}", f"stages.umap.init={first}/"]
    assert load_demo(*same).stages["um"].forget.estimate == "estimate"  # a folder, its model.pt, a trailing slash
    with pytest.raises(config.ConfigError, match=f"stages.um.init: '{second / 'model.pt'}' differs from stages.estimate.init"):
        load_demo(*same, f"stages.um.init={second / 'model.pt'}")


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
    cfg = load_demo(f"stages.background.init={ckpt}")
    assert cfg.stages["background"].init == str(ckpt)


def test_flatten_gives_mlflow_params():
    flat = config.flatten(config.to_dict(load_demo()))
    assert flat["stages.um.forget.estimate"] == "estimate"
    assert flat["ray.num_workers"] == 2
    assert flat["stages.umap.mask.mask_ratio"] == 0.2 and flat["model.kwargs"] == {}  # an empty section stays a value


def test_a_changed_config_is_named_key_by_key_and_placement_keys_may_change():
    then = config.to_dict(load_demo())
    now = config.flatten(config.to_dict(load_demo("stages.um.lr=0.5", "ray.address=ray://head:10001")))
    for saved in (config.flatten(then), then):  # flat as state files keep it, or nested as older sweep.json did
        with pytest.raises(config.ConfigError, match=r"pipeline 'demo' was started with another config "
                                                     r"\(differs in: stages.um.lr\); rerun with --restart"):
            config.check_unchanged("pipeline", "demo", now, saved)
    config.check_unchanged("pipeline", "demo", config.flatten(config.to_dict(load_demo("ray.address=ray://head:10001"))),
                           then)


def test_yaml_anchors_load_within_the_budget_and_alias_bombs_do_not(tmp_path):
    """Anchors that share settings between stages are fine; a document that expands past the node budget, nests
    past the depth limit or repeats itself is refused, naming the file, before anything is built."""
    shared = tmp_path / "shared.yaml"
    shared.write_text("stages:\n  a: &common {epochs: 3, lr: 0.05}\n  b: *common\n"
                      "eval: {scores: &s [msp, energy], final_scores: *s}\n")
    cfg = config.load(shared)
    assert cfg.stages["b"].epochs == 3 and cfg.eval.final_scores == ["msp", "energy"]

    levels = ["l0: &l0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 6)]  # 10^6 values
    for text, says in [("\n".join(levels), "more than 100,000 values"), ("a: " + "[" * 65 + "]" * 65, "nested more than 64"),
                       ("a: &x [1, *x]", "alias *x (line 1) repeats a value that contains it"),
                       ("a: *nothing", "alias *nothing (line 1) names no anchor defined before it")]:
        shared.write_text(text)
        with pytest.raises(config.ConfigError, match=f"^{re.escape(str(shared))}: .*{re.escape(says)}"):
            config.load(shared)
    with pytest.raises(config.ConfigError, match="override 'stages.a.lr': more than 100,000 values"):
        config.read(None, ["stages.a.lr=" + "[" + "&a [" + ",".join("0" * 500) + "], " + ", ".join(["*a"] * 300) + "]"])
