"""Adaptive-depth model zoo: registry, ResNet / MobileNetV2 / ViT / Swin ADN families, MACs, weight loaders."""
from .base import AdaptiveDepthNet, SkipConfig, all_skip_configs, normalize_skip, skip_to_str
from .layers import SkipAwareBatchNorm2d, SkipAwareLayerNorm, copy_norms_to_twins
from .registry import (ModelInfo, checkpoint_model_config, create_model, list_models, model_summary,
                       register_model)
from . import mobilenetv2, resnet, swin, vit  # noqa: F401  (registers the models)
from .mobilenetv2 import MobileNetV2ADN
from .resnet import ResNetADN
from .swin import SwinADN
from .vit import ViTADN
from .macs import count_macs, macs_per_exit, params_per_exit, piece_macs
from .torchvision_weights import LoadReport, load_torchvision_state_dict
from .authors_weights import load_authors_state_dict

__all__ = [
    "AdaptiveDepthNet", "SkipConfig", "all_skip_configs", "normalize_skip", "skip_to_str",
    "SkipAwareBatchNorm2d", "SkipAwareLayerNorm", "copy_norms_to_twins",
    "ModelInfo", "checkpoint_model_config", "create_model", "list_models", "model_summary", "register_model",
    "ResNetADN", "MobileNetV2ADN", "ViTADN", "SwinADN", "count_macs", "macs_per_exit", "params_per_exit", "piece_macs",
    "LoadReport", "load_torchvision_state_dict", "load_authors_state_dict",
]
