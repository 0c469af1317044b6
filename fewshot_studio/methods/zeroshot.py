"""Zero-shot CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021; https://github.com/openai/CLIP): logits = s · f · tᵀ with t the normalised
mean of the class's prompt-ensemble text features."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import KnowledgeGraph, Method, MethodConfig, cosine_matrix, register


@dataclass
class ZeroShotConfig(MethodConfig):
    templates: tuple[str, ...] | None = field(  # None: the backbone's prompt ensemble
        default=None, metadata={"help": "prompt templates (blank: the backbone's prompt ensemble)"})


@register
class ZeroShot(Method):
    name = "zeroshot"
    label = "Zero-shot CLIP"
    summary = "Zero-shot CLIP: nothing trains; class names (and descriptions) become the classifier."
    cost = 0
    auto_candidate = "always"
    order = 6
    Config = ZeroShotConfig
    needs_images = False

    def __init__(self, backbone, classnames, descriptions=None, config=None):
        super().__init__(backbone, classnames, descriptions, config)
        self.register_buffer("text_weights", torch.zeros(len(self.classnames), backbone.embed_dim))

    def _fit(self, support, extractor, progress, cancel):
        from ..progress import Progress

        self._check_support(support)
        if progress:
            progress(Progress("Encoding class prompts", 0, 1))
        self.text_weights = extractor.class_text_features(self.classnames, self.descriptions,
                                                          self.config.templates).to(self._device())
        if progress:
            progress(Progress("Encoding class prompts", 1, 1))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * features @ self.text_weights.T

    def knowledge_graph(self) -> KnowledgeGraph:
        return KnowledgeGraph(self.classnames, cosine_matrix(self.text_weights), None, None, self.support_counts)
