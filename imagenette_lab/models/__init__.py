"""Model zoo: the report's networks built from scratch by name (``create_model``), with ablation flags."""

from .googlenet import GoogLeNet
from .hybrid import HybridBlock, HybridMobileNetV2
from .layers import ACTIVATIONS, NORMS, BlurPool
from .registry import MODEL_NAMES, count_macs, count_params, create_model, model_spec

__all__ = [
    "ACTIVATIONS",
    "MODEL_NAMES",
    "NORMS",
    "BlurPool",
    "GoogLeNet",
    "HybridBlock",
    "HybridMobileNetV2",
    "count_macs",
    "count_params",
    "create_model",
    "model_spec",
]
