"""Class prompts: the template ensembles and the one way a class name (and its optional
description) becomes prompt text. Every method's text side goes through `class_prompts`.

    class_prompts("red_circle", "round and red", GENERIC_TEMPLATES)
    # ["a photo of a red circle. round and red", "a photo of the red circle. round and red", ...]

Pure Python: no torch here.
"""
from __future__ import annotations

from typing import Sequence

from .shapes import CAPTION_TEMPLATES

# Generic prompt ensemble for real CLIP weights (a subset of CLIP's ImageNet templates).
GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "itap of a {}.",
)

# The tiny backbone's ensemble: the caption templates it was pretrained on (shapes.py owns them,
# since they are part of its synthetic world and tiny.py pretrains with them).
TINY_TEMPLATES: tuple[str, ...] = CAPTION_TEMPLATES


def templates_for(tiny: bool) -> tuple[str, ...]:
    """The prompt ensemble for a backbone: TINY_TEMPLATES for the tiny backbone, else GENERIC_TEMPLATES."""
    return TINY_TEMPLATES if tiny else GENERIC_TEMPLATES


def prompt_name(classname: str) -> str:
    """Folder-style class names read '_' as a space in prompts."""
    return classname.replace("_", " ").strip()


def class_prompts(classname: str, description: str | None, templates: Sequence[str]) -> list[str]:
    """One prompt per template: the template filled with `prompt_name(classname)`, followed by
    " <description>" when the class has a (non-blank) description."""
    name = prompt_name(classname)
    extra = f" {description.strip()}" if description and description.strip() else ""
    return [t.format(name) + extra for t in templates]
