"""Method registry: `method.name` in the YAML → the class in agcl_ds/methods/<name>.py."""

from __future__ import annotations

import importlib

from agcl_ds.config import ConfigError, MethodConfig, from_dict
from agcl_ds.methods.base import Method

METHODS: dict[str, str] = {
    "seq": "agcl_ds.methods.seq:Seq",
    "agcl": "agcl_ds.methods.agcl:Agcl",
    "replay": "agcl_ds.methods.replay:Replay",
    "ewc": "agcl_ds.methods.ewc:Ewc",
    "mas": "agcl_ds.methods.mas:Mas",
    "freeze": "agcl_ds.methods.freeze:Freeze",
    "agcl_replay": "agcl_ds.methods.agcl_replay:AgclReplay",
    "olora": "agcl_ds.methods.olora:Olora",
    "osf": "agcl_ds.methods.osf:Osf",
    "hft": "agcl_ds.methods.hft:Hft",
    "magmask": "agcl_ds.methods.magmask:Magmask",
}


def build_method(cfg: MethodConfig) -> Method:
    if cfg.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {cfg.name!r} (known: {', '.join(sorted(METHODS))})")
    module, cls_name = METHODS[cfg.name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    return cls(from_dict(cls.Options, cfg.options, "method.options"))
