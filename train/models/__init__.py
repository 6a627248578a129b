"""Adaptive-depth model zoo: registry, ResNet-ADN / ViT-ADN families, MACs and torchvision weights."""
from .base import AdaptiveDepthNet, SkipConfig, all_skip_configs, normalize_skip, skip_to_str
from .layers import SkipAwareBatchNorm2d, SkipAwareLayerNorm, copy_norms_to_twins
from .registry import ModelInfo, create_model, list_models, model_summary, register_model
from . import resnet, vit  # noqa: F401  (registers the models)
from .resnet import ResNetADN
from .vit import ViTADN
from .macs import count_macs, macs_per_exit, params_per_exit, piece_macs
from .torchvision_weights import LoadReport, load_torchvision_state_dict

__all__ = [
    "AdaptiveDepthNet", "SkipConfig", "all_skip_configs", "normalize_skip", "skip_to_str",
    "SkipAwareBatchNorm2d", "SkipAwareLayerNorm", "copy_norms_to_twins",
    "ModelInfo", "create_model", "list_models", "model_summary", "register_model",
    "ResNetADN", "ViTADN", "count_macs", "macs_per_exit", "params_per_exit", "piece_macs",
    "LoadReport", "load_torchvision_state_dict",
]
