"""Methods behind one interface (see base.Method): zero-shot CLIP, Tip-Adapter(-F), GraphAdapter, MMA."""
from __future__ import annotations

import importlib

from .base import REGISTRY, Method, get_method_class, load_model, make_config, make_method, read_model_config
from .knowledge_graph import KnowledgeGraph

# CLI/UI names -> modules; a module registers its class on import
_MODULES = ("zeroshot", "tip_adapter", "graph_adapter", "mma")


def ensure_registered() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{m}":
                raise


__all__ = ["REGISTRY", "KnowledgeGraph", "Method", "ensure_registered", "get_method_class", "load_model",
           "make_config", "make_method", "read_model_config"]
