"""Training methods as a registry, like timm's models and oodlab's scores.

Each module of this package defines one method and registers it (`base.register_method`): its config section,
what it trains and its loss term. A train stage switches a method on by carrying its section (`forget`, `mask`,
`background`, `oe`, `logitnorm`); sections combine in one stage. Adding a method is a module here and its test:
importing this package imports every module in it. Method modules import torch and the losses inside their methods:
validating a config builds the sections, and a refused document should not wait for torch to load.
"""

from __future__ import annotations

import importlib
import pkgutil

from oodlab.methods.base import Method, Step, TrainMethod, register_method, registered

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "Step", "TrainMethod", "register_method", "registered"]
