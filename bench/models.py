"""Backbones and the embedding head.

`build_model(config, in_channels, seed)` always draws its initial weights from `seed` alone, so every loss
trained with the same seed starts from the identical network: the comparison changes only the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ModelConfig

BackboneFactory = Callable[[ModelConfig, int], tuple[nn.Module, int]]
_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: `factory(config, in_channels) -> (module producing (N, F) features, F)`."""

    def wrap(factory: BackboneFactory) -> BackboneFactory:
        _BACKBONES[name] = factory
        return factory

    return wrap


def available_backbones() -> list[str]:
    return sorted(_BACKBONES)


class EmbeddingNet(nn.Module):
    """Backbone features -> linear head -> L2-normalised embedding."""

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int, freeze_bn: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for module in self.batchnorms():
                for parameter in module.parameters():
                    parameter.requires_grad_(False)

    def batchnorms(self) -> list[nn.Module]:
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> EmbeddingNet:
        """Frozen BatchNorm (the paper's setting) keeps running statistics fixed even while training."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.batchnorms():
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)).float(), dim=1)


def build_model(config: ModelConfig, in_channels: int, seed: int) -> EmbeddingNet:
    if config.backbone not in _BACKBONES:
        raise ValueError(f"model.backbone: unknown {config.backbone!r}; available: {', '.join(available_backbones())}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, feature_dim = _BACKBONES[config.backbone](config, in_channels)
        return EmbeddingNet(backbone, feature_dim, config.embedding_dim, config.freeze_bn)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2, ceil_mode=True))


@register_backbone("convnet")
def small_convnet(config: ModelConfig, in_channels: int) -> tuple[nn.Module, int]:
    """Four conv-BN-ReLU-pool blocks (the few-shot literature's Omniglot network, widened) and global pooling."""
    if config.pretrained:
        raise ValueError("model.pretrained: the convnet backbone has no pretrained weights")
    widths = (16, 32, 64, 128)
    layers, cin = [], in_channels
    for width in widths:
        layers.append(_conv_block(cin, width))
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), widths[-1]


class _GreyToRGB(nn.Module):
    """ImageNet backbones take three channels; grey images are repeated rather than changing the first conv."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _resnet(arch: str, weights_name: str) -> BackboneFactory:
    def factory(config: ModelConfig, in_channels: int) -> tuple[nn.Module, int]:
        import torchvision

        if in_channels not in (1, 3):
            raise ValueError(f"model.backbone={arch} takes 1- or 3-channel images, got {in_channels}")
        net = getattr(torchvision.models, arch)(weights=None)
        if config.pretrained:
            net.load_state_dict(cached_imagenet_weights(arch, weights_name))
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        return nn.Sequential(_GreyToRGB(), net), feature_dim

    return factory


def cached_imagenet_weights(arch: str, weights_name: str) -> dict[str, torch.Tensor]:
    """Load torchvision's ImageNet weights from the local torch hub cache; never downloads."""
    import torchvision

    weights = torchvision.models.get_weight(f"{_WEIGHT_ENUMS[arch]}.{weights_name}")
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained: ImageNet weights for {arch} not found at {path}. Download {weights.url} there "
            "(or set TORCH_HOME), or set model.pretrained=false."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


_WEIGHT_ENUMS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}
register_backbone("resnet18")(_resnet("resnet18", "IMAGENET1K_V1"))
register_backbone("resnet50")(_resnet("resnet50", "IMAGENET1K_V1"))


def parameter_groups(model: EmbeddingNet, lr: float, head_lr: float | None) -> list[dict]:
    """Backbone and head as separate optimiser groups: the paper trains the new head faster."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    return [{"params": backbone, "lr": lr, "name": "backbone"},
            {"params": list(model.head.parameters()), "lr": head_lr if head_lr is not None else lr, "name": "head"}]
