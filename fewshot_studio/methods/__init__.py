"""Methods behind one interface (see base.Method): zero-shot CLIP, Tip-Adapter(-F), GraphAdapter, MMA,
GDA, ProKeR.

The catalog (catalog.py) lists them; each module below registers its class(es) on import, so a
new method is one module plus one import line here (README, "Adding a method").
"""
from __future__ import annotations

from . import zeroshot  # noqa: F401
from . import tip_adapter  # noqa: F401
from . import graph_adapter  # noqa: F401
from . import mma  # noqa: F401
from . import gda  # noqa: F401
from . import proker  # noqa: F401
from .base import Method, load_model, make_method, read_model_config
from .knowledge_graph import KnowledgeGraph
from .catalog import REGISTRY, get_method_class, make_config, register

__all__ = ["REGISTRY", "KnowledgeGraph", "Method", "get_method_class", "load_model", "make_config", "make_method",
           "read_model_config", "register"]
