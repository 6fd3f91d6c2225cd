"""Bad input through the CLI: exit 2 and a message naming the field and the fix, before any cluster work.

Each case runs one `oodlab` command in-process on the tiny digits data and must leave no MLflow store and no run
folder behind: nothing was started. Config, benchmark YAML, data, checkpoint and CLI mistakes alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw

from oodlab.cli import main
from oodlab.distributed.pipeline import PipelineState
from oodlab.models import create_model


@dataclass
class Setup:
    tmp: Path
    data: Path  # the built digits benchmark

    @property
    def config(self) -> str:
        return str(self.tmp / "cfg.yaml")

    def write(self, name: str, content: str | dict) -> str:
        path = self.tmp / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return str(path)

    def weights(self, name: str, model: str = "resnet_tiny_cifar", classes: int = 10) -> str:
        path = self.tmp / name
        torch.save(create_model(model, num_classes=classes).state_dict(), path)
        return str(path)

    def benchmark(self, **changes) -> str:
        """The digits benchmark YAML (reading the built files under the test's data root) with `changes`."""
        spec = yaml.safe_load((Path(__file__).parents[1] / "datapipes/builtin_benchmarks/digits.yaml").read_text())
        return self.write("bench.yaml", {**spec, **changes})


Argv = Callable[[Setup], list[str]]
CASES: list[tuple[str, Argv, str]] = [
    # config
    ("unknown key", lambda s: ["train", s.config, "stages.train.lrr=0.1"], "stages.train.lrr: unknown key"),
    ("negative lr", lambda s: ["train", s.config, "stages.train.lr=-1"], "stages.train.lr: Input should be greater than 0"),
    ("zero epochs", lambda s: ["train", s.config, "stages.train.epochs=0"], "stages.train.epochs"),
    ("zero workers", lambda s: ["train", s.config, "ray.num_workers=0"], "ray.num_workers"),
    ("unknown model", lambda s: ["train", s.config, "model.name=resnet18_cifr"], "Did you mean: resnet18_cifar"),
    ("unknown score", lambda s: ["train", s.config, "eval.scores=[msp,energi]"], "unknown score(s) ['energi']"),
    ("select not scored", lambda s: ["train", s.config, "eval.select=knn"], "eval.select: 'knn' must be in both"),
    ("unknown stage init", lambda s: ["train", s.config, "stages.train.init=nope"], "stages.train.init"),
    ("custom CPU resource", lambda s: ["train", s.config, "ray.resources_per_worker={CPU: 1}"],
     "CPU and GPU come from ray.cpus_per_worker"),
    ("amp without GPU", lambda s: ["train", s.config, "ray.amp=true"], "ray.amp: bf16 autocast is for GPUs"),
    ("batch below workers", lambda s: ["train", s.config, "data.batch_size=1"], "data.batch_size (1) must be >="),
    ("unknown benchmark", lambda s: ["train", s.config, "data.benchmark=cifar11"], "cifar11"),
    ("unreachable tracking server", lambda s: ["train", s.config, "mlflow.tracking_uri=http://u:secret@127.0.0.1:9"],
     "the MLflow server at http://***@127.0.0.1:9 does not answer"),
    ("unreachable ray address", lambda s: ["train", s.config, "ray.address=127.0.0.1:9"],
     "ray.address: nothing answers at '127.0.0.1:9'"),
    ("more workers than CPUs", lambda s: ["train", s.config, "ray.num_workers=8", "data.batch_size=64"],
     "ray: 8 workers x 1.0 CPUs = 8.0 CPUs, but the cluster has 2.0"),
    ("GPU workers without GPUs", lambda s: ["train", s.config, "ray.use_gpu=true"], "GPU workers, but the cluster has 0"),
    ("changed config under a run name", lambda s: [*changed_run(s), "stages.train.lr=0.2"],
     "differs in: stages.train.lr); rerun with --restart"),
    ("bad search key", lambda s: ["tune", s.config, "search.space={stages.trian.lr: {dist: uniform, low: 0.01, high: 0.1}}"],
     "'stages.trian.lr' is not a setting of this config"),
    # benchmark YAML
    ("benchmark without id.train", lambda s: ["data", "build", s.write("b.yaml", {"name": "b", "image_size": 8,
                                                                                   "id": {"test": "x"}}), "--out", str(s.tmp)],
     "id.train"),
    ("benchmark unknown key", lambda s: ["data", "build", s.benchmark(imagesize=3), "--out", str(s.tmp)], "imagesize"),
    ("benchmark bad augment", lambda s: ["data", "build", s.benchmark(augment="rotate"), "--out", str(s.tmp)], "augment"),
    ("benchmark missing source", lambda s: ["data", "build", s.write("b.yaml", {"name": "b", "image_size": 8,
                                            "id": {"train": "no/such", "test": "no/such2"}, "ood": {"val": "x", "far": {"y": "z"}}}),
                                            "--out", str(s.tmp), "--root", str(s.tmp)], "no/such"),
    ("benchmark YAML syntax", lambda s: ["data", "build", s.write("b.yaml", "name: [b\n"), "--out", str(s.tmp)], "b.yaml"),
    # data
    ("no built files", lambda s: ["train", s.config, f"data.root={s.tmp / 'empty'}"], "is missing 8 file(s)"),
    ("labels beyond num_classes", lambda s: ["train", s.config, f"data.benchmark={s.benchmark(num_classes=5)}"],
     "are outside [0, 5)"),
    ("images smaller than image_size", lambda s: ["train", s.config, f"data.benchmark={s.benchmark(image_size=64)}"],
     "smaller than image_size 64"),
    ("damaged beton", lambda s: ["train", s.config, f"data.root={damaged_copy(s)}"], "id_test.beton"),
    # checkpoints
    ("init file missing", lambda s: ["train", s.config, f"stages.train.init={s.tmp / 'none.pt'}"], "none.pt"),
    ("init with another class count", lambda s: ["train", s.config, f"stages.train.init={s.weights('c3.pt', classes=3)}"],
     "does not fit model resnet_tiny_cifar with 10 classes"),
    ("init of another model", lambda s: ["train", s.config, f"stages.train.init={s.weights('cnn.pt', 'small_cnn')}"],
     "does not fit model resnet_tiny_cifar"),
    ("init not a checkpoint", lambda s: ["train", s.config, f"stages.train.init={s.write('junk.pt', 'junk')}"],
     "is not a checkpoint of weights"),
    ("eval of a missing checkpoint", lambda s: ["eval", s.config, "--checkpoint", str(s.tmp / "none")], "none"),
    # CLI
    ("config file missing", lambda s: ["train", str(s.tmp / "nope.yaml")], "nope.yaml does not exist"),
    ("config YAML syntax", lambda s: ["train", s.write("broken.yaml", "stages: {train: [\n")], "not valid YAML"),
    ("override without =", lambda s: ["train", s.config, "stages.train.lr"], "stages.train.lr"),
    ("submit with a relative data root", lambda s: ["submit", s.config, "data.root=rel/data", "--address",
                                                    "http://127.0.0.1:9"], "data.root: rel/data is relative"),
]


def changed_run(s: Setup) -> list[str]:
    """A config whose run name has state from an earlier run (with the default lr)."""
    from oodlab import config
    from oodlab.distributed import pipeline, tracking

    cfg = config.load(s.config)
    PipelineState(pipeline.state_path(cfg), config=tracking.redacted_config(cfg)).save()
    return ["train", s.config]


def damaged_copy(s: Setup) -> Path:
    """The built digits files with id_test.beton cut in half."""
    import shutil

    root = s.tmp / "damaged"
    shutil.copytree(s.data, root)
    beton = root / "digits" / "id_test.beton"
    beton.write_bytes(beton.read_bytes()[: beton.stat().st_size // 2])
    return root


NEEDS_RAY = {"more workers than CPUs", "GPU workers without GPUs"}  # the cluster's size is asked of Ray


@pytest.mark.parametrize("argv, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_exits_2_naming_the_field_before_any_work(argv: Argv, expected: str, tmp_path, demo_root, capsys,
                                                            request):
    if request.node.callspec.id in NEEDS_RAY:
        request.getfixturevalue("ray_cluster")
    setup = Setup(tmp_path, demo_root)
    raw = tiny_raw(tmp_path, demo_root)
    Path(setup.config).write_text(yaml.safe_dump(raw))
    assert main(argv(setup)) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and "secret" not in err
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run, no Ray run folder
    assert not any((tmp_path / "runs").glob("*.*"))
