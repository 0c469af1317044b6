"""What every command shares: the one-line user error, the backbone and storage flags, and the
AppConfig, backbone and feature extractor a command's flags ask for."""
from __future__ import annotations

import argparse
import sys

from ..errors import FewShotError


class UserError(FewShotError):
    pass


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None,
                   help="open_clip model name (default ViT-B-32, or $FEWSHOT_STUDIO_BACKBONE) or 'tiny'")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default openai)")
    p.add_argument("--checkpoint", default=None, help="local checkpoint file or directory instead of a download")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None,
                   help="feature cache directory (default $FEWSHOT_STUDIO_CACHE or <data dir>/features)")
    p.add_argument("--data-dir", default=None, help="data directory (default $FEWSHOT_STUDIO_DATA)")


def config_from(args):
    """The one AppConfig of a command: its flags over the environment."""
    from ..config import AppConfig

    return AppConfig.from_env(data_dir=getattr(args, "data_dir", None), cache_dir=getattr(args, "cache_dir", None))


def backbone_from(args):
    """The backbone the flags name, the configured one (AppConfig) for what they leave out."""
    from ..backbone import BackboneSpec, load_backbone

    spec = BackboneSpec.from_config(config_from(args), name=args.backbone, pretrained=args.pretrained,
                                    checkpoint=args.checkpoint, device=args.device)
    if spec.name == "tiny" and not args.pretrained:
        spec = BackboneSpec("tiny", None, spec.checkpoint, spec.device)
    return load_backbone(spec)


def extractor_from(backbone, args):
    from ..cache import FeatureCache
    from ..features import FeatureExtractor

    return FeatureExtractor(backbone, FeatureCache(config_from(args).cache_dir))


def stderr_progress(p) -> None:
    print(f"\r{p}".ljust(70), end="", file=sys.stderr, flush=True)
