"""The config's search section as a Ray Tune param space, and sampled points as validated configs.

A sampled point is a set of `key.sub=value` overrides: each trial's config is the sweep's config with
them applied by `oodlab.config.apply_overrides` and validated like any config. `check_space` does the
same for every bound and listed value of every dimension before Ray starts, so a typo in a key or an
impossible range fails at once, naming the key.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from oodlab.config import Config, ConfigError, Dist, SearchConfig, apply_overrides, to_dict, validate

FIXED_FOR_THE_SWEEP = ("name", "ray", "mlflow", "search")  # trial resources, tracking and naming


def dimension(dist: Dist) -> Any:
    """One Dist as a Tune domain (randint includes `high`; grid becomes tune.grid_search)."""
    if dist.dist == "uniform":
        return tune.uniform(dist.low, dist.high)
    if dist.dist == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    if dist.dist == "randint":
        return tune.randint(int(dist.low), int(dist.high) + 1)
    if dist.dist == "choice":
        return tune.choice(dist.values)
    return tune.grid_search(dist.values)


def to_tune(space: Mapping[str, Dist]) -> dict[str, Any]:
    """The param space: override path -> Tune domain (flat; the paths contain dots, never slashes)."""
    return {key: dimension(dist) for key, dist in space.items()}


def expected_trials(search: SearchConfig) -> int:
    """Trials a complete sweep runs: num_samples for each point of the grid dimensions."""
    return search.num_samples * math.prod(len(d.values) for d in search.space.values() if d.dist == "grid")


def yaml_value(value: Any) -> str:
    """A sampled value as override text that YAML reads back to the same value (1e-05 stays a float)."""
    plain = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune's samplers
    return yaml.safe_dump(plain, default_flow_style=True, width=1 << 30).removesuffix("\n...\n").strip()


def overrides(params: Mapping[str, Any]) -> list[str]:
    return [f"{key}={yaml_value(value)}" for key, value in params.items()]


def sampled_config(raw: dict[str, Any], params: Mapping[str, Any]) -> Config:
    """The config of one sampled point: overrides applied to a copy of `raw`, then validated."""
    return validate(apply_overrides(copy.deepcopy(raw), overrides(params)), Path.cwd())


def check_space(cfg: Config, raw: dict[str, Any] | None = None) -> None:
    """Fail before Ray starts if a key names no setting of `cfg` or a bound / value makes an invalid config.

    `cfg` has a search section; `raw` is the dict trials start from (default: `cfg` itself).
    """
    raw = to_dict(cfg) if raw is None else raw
    for key, dist in cfg.search.space.items():
        check_path(raw, key)
        for value in representative_values(dist):
            try:
                sampled_config(raw, {key: value})
            except ConfigError as err:
                raise ConfigError(f"search.space.{key}: the value {value!r} gives an invalid config:\n{err}") from None


def check_path(raw: dict[str, Any], key: str) -> None:
    """`key` must name an existing setting: no new stages or sections appear by a typo."""
    parts = key.split(".")
    if parts[0] in FIXED_FOR_THE_SWEEP:
        raise ConfigError(f"search.space: '{key}' cannot be searched; "
                          f"{', '.join(FIXED_FOR_THE_SWEEP)} are fixed for a sweep")
    node: Any = raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config"
        if node is None:
            raise ConfigError(f"search.space: '{key}': '{where}' is not set in this config; "
                              "add the section to search inside it")
        if not isinstance(node, dict):
            raise ConfigError(f"search.space: '{key}': '{where}' is a value, not a section")
        if part not in node:
            close = difflib.get_close_matches(part, list(node), n=1)
            hint = f" did you mean '{close[0]}'?" if close else f" it has: {', '.join(node)}"
            raise ConfigError(f"search.space: '{key}' is not a setting of this config: '{where}' has no '{part}';{hint}")
        node = node[part]


def representative_values(dist: Dist) -> list[Any]:
    if dist.values is not None:
        return list(dist.values)
    if dist.dist == "randint":
        return [int(dist.low), int(dist.high)]
    return [dist.low, dist.high]
