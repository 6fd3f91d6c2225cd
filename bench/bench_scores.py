"""Every post-hoc score from one cached inference pass vs one inference pass per score.

Runs on the digits benchmark's real .beton files (written to a temp folder if --root is not given),
single process, CPU or GPU. Prints each score's own cost on the cache (fitting included), seconds for
both ways and the ratio (higher = caching wins), and both against one plain inference pass over the
same splits (the cost floor of any evaluation).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from oodlab.datapipes.benchmarks import get_benchmark
from oodlab.datapipes.build import build
from oodlab.datapipes.loaders import LoaderSpec, build_loader
from oodlab.distributed.evaluate import local_outputs
from oodlab.models import FeatureNet, create_model
from oodlab.scores import NEEDS_INPUTS, Fit, available_scores, build_scorers, odin_scores

CACHED = [s for s in available_scores() if s not in NEEDS_INPUTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, help="data root holding digits/*.beton (default: write to a temp dir)")
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp())
    bench = get_benchmark("digits")
    build(bench, root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = FeatureNet(create_model(args.model, num_classes=bench.num_classes)).to(device).eval()
    loaders = {s: build_loader(bench, LoaderSpec(bench.path(root, s), args.batch_size, device=device))
               for s in bench.splits}
    for loader in loaders.values():  # compile every FFCV pipeline before timing
        next(iter(loader))
    eval_splits = [s for s in bench.splits if s != "id_train"]

    def score_all(outputs: dict, names: list[str]) -> None:
        fit = Fit(net.head(), outputs["id_train"], outputs["id_val"])
        for scorer in build_scorers(names, fit, {"knn": {"k": 10}}).values():
            for s in eval_splits:
                scorer(outputs[s])

    def odin() -> None:
        for s in eval_splits:
            for x, _ in loaders[s]:
                odin_scores(lambda t: net(t)[0], x, std=bench.std)

    start = time.perf_counter()
    with torch.no_grad():
        for loader in loaders.values():
            for x, _ in loader:
                net(x)
    plain_s = time.perf_counter() - start

    start = time.perf_counter()
    cache = {s: local_outputs(net, loader) for s, loader in loaders.items()}
    score_all(cache, CACHED)
    cached_no_odin_s = time.perf_counter() - start
    odin()
    cached_s = time.perf_counter() - start

    start = time.perf_counter()
    for name in CACHED:
        score_all({s: local_outputs(net, loader) for s, loader in loaders.items()}, [name])
    odin()
    separate_s = time.perf_counter() - start

    own_s = {}
    for name in CACHED:  # each score alone on the cache: fitting plus scoring every split
        start = time.perf_counter()
        score_all(cache, [name])
        own_s[name] = time.perf_counter() - start

    n, k = sum(len(loader.indices) for loader in loaders.values()), len(CACHED)
    print(f"model {args.model} on {device}, {n} images over {len(loaders)} splits, {k + 1} scores "
          "(odin runs its own pass)")
    print("each score on the cache (fit + every split), s: " + ", ".join(f"{s} {t:.3f}" for s, t in own_s.items()))
    print(f"one plain inference pass:               {plain_s:7.2f} s")
    print(f"one cached pass + {k} scores (no ODIN):  {cached_no_odin_s:7.2f} s")
    print(f"one cached pass + {k + 1} scores:            {cached_s:7.2f} s")
    print(f"one pass per score:                     {separate_s:7.2f} s")
    print(f"ratio (separate / cached): {separate_s / cached_s:.2f}x")
    print(f"vs one plain pass: cached + {k} scores {cached_no_odin_s / plain_s:.2f}x, "
          f"cached + {k + 1} scores {cached_s / plain_s:.2f}x")


if __name__ == "__main__":
    main()
