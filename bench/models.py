"""Backbones and the embedding head.

`build_model(config, in_channels, seed)` always draws its initial weights from `seed` alone, so every loss
trained with the same seed starts from the identical network: the comparison changes only the loss.
Backbones: the registered ones (`convnet`, torchvision's `resnet18` and `resnet50`) and any timm model as
`timm/<name>` (the `timm` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

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
    if config.backbone.startswith(TIMM_PREFIX):
        factory = timm_backbone
    elif config.backbone in _BACKBONES:
        factory = _BACKBONES[config.backbone]
    else:
        raise ValueError(
            f"model.backbone: unknown {config.backbone!r}; available: {', '.join(available_backbones())}, "
            f"or {TIMM_PREFIX}<name> for any timm model"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, feature_dim = factory(config, in_channels)
        return EmbeddingNet(backbone, feature_dim, config.embedding_dim, config.freeze_bn)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
    )


@register_backbone("convnet")
def small_convnet(config: ModelConfig, in_channels: int) -> tuple[nn.Module, int]:
    """Four conv-BN-ReLU-pool blocks (the few-shot literature's Omniglot network, widened) and global
    pooling."""
    if config.pretrained:
        raise ValueError("model.pretrained: the convnet backbone has no pretrained weights")
    widths = (16, 32, 64, 128)
    layers, cin = [], in_channels
    for width in widths:
        layers.append(_conv_block(cin, width))
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), widths[-1]


class _GreyToRGB(nn.Module):
    """ImageNet backbones take three channels; grey images are repeated rather than changing the first
    conv."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _resnet(arch: str, weights_name: str) -> BackboneFactory:
    def factory(config: ModelConfig, in_channels: int) -> tuple[nn.Module, int]:
        import torchvision

        if in_channels not in (1, 3):
            raise ValueError(f"model.backbone={arch} takes 1- or 3-channel images, got {in_channels}")
        net = getattr(torchvision.models, arch)(weights=None)
        if config.pretrained:
            net.load_state_dict(imagenet_weights(arch, weights_name))
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        return nn.Sequential(_GreyToRGB(), net), feature_dim

    return factory


def imagenet_weights(arch: str, weights_name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from the torch hub cache, fetched there first when missing by
    torchvision's own download (progress bar, hash check); offline, a FileNotFoundError names the URL and
    the cache path."""
    import torchvision

    weights = torchvision.models.get_weight(f"{_WEIGHT_ENUMS[arch]}.{weights_name}")
    try:
        return weights.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
    except (URLError, ConnectionError, TimeoutError) as error:  # HTTPError is a URLError
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
        raise FileNotFoundError(
            f"model.pretrained: ImageNet weights for {arch} not found at {path}, and downloading them failed "
            f"({getattr(error, 'reason', error)}). Download {weights.url} there (or set TORCH_HOME), "
            "or set model.pretrained=false."
        ) from error


_WEIGHT_ENUMS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}
register_backbone("resnet18")(_resnet("resnet18", "IMAGENET1K_V1"))
register_backbone("resnet50")(_resnet("resnet50", "IMAGENET1K_V1"))

TIMM_PREFIX = "timm/"


class TimmTrunk(nn.Module):
    """A timm model without its classifier, fed in its own normalisation and checked against its input size.

    Datasets read from image files arrive normalised with ImageNet's mean and std (bench.data.transforms,
    shared by every backbone); an exact per-channel affine map turns that into the model's own normalisation,
    so a model trained with other statistics (e.g. 0.5/0.5 for many ViTs) sees what it was trained on.
    (Omniglot's in-memory ink images are not normalised for any backbone.) Models with a fixed input size
    (ViT-style patch embeddings) say which `data.image_size` they need.
    """

    def __init__(self, name: str, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        from bench.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        super().__init__()
        self.name, self.net = name, net
        own_mean, own_std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        scale = torch.tensor(IMAGENET_STD) / own_std  # (x * std_in + mean_in - mean) / std
        shift = (torch.tensor(IMAGENET_MEAN) - own_mean) / own_std
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        patch_embed = getattr(net, "patch_embed", None)
        strict = getattr(patch_embed, "strict_img_size", False)
        self.fixed_size = tuple(patch_embed.img_size) if strict else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.fixed_size is not None and tuple(images.shape[-2:]) != self.fixed_size:
            height, width = self.fixed_size
            raise ValueError(
                f"model.backbone {TIMM_PREFIX}{self.name} takes {height}x{width} images, got "
                f"{images.shape[-2]}x{images.shape[-1]}: set data.image_size={height}"
            )
        return self.net(images * self.scale + self.shift)  # (N, 1, H, W) grey images broadcast to 3 channels


def timm_backbone(config: ModelConfig, in_channels: int) -> tuple[nn.Module, int]:
    """`timm/<name>`: timm.create_model(name, num_classes=0) (pooled features, no classifier), with timm's
    pretrained weights when `model.pretrained`, its feature size, and its own normalisation (TimmTrunk)."""
    try:
        import timm
    except ImportError:
        raise ValueError(
            f"model.backbone={config.backbone} needs timm: pip install 'smoothap-bench[timm]'"
        ) from None
    name = config.backbone[len(TIMM_PREFIX) :]
    if not timm.is_model(name):
        raise ValueError(
            f"model.backbone: timm has no model {name!r} (timm.list_models('*part-of-name*') lists them)"
        )
    if in_channels not in (1, 3):
        raise ValueError(f"model.backbone={config.backbone} takes 1- or 3-channel images, got {in_channels}")
    try:
        net = timm.create_model(name, pretrained=config.pretrained, num_classes=0)
    except OSError as error:  # offline without a cached copy (huggingface_hub's errors are OSErrors)
        raise FileNotFoundError(
            f"model.pretrained: timm's weights for {name} are not cached and could not be downloaded "
            f"({error}); or set model.pretrained=false"
        ) from error
    data_config = timm.data.resolve_model_data_config(net)
    feature_dim = getattr(net, "head_hidden_size", None) or net.num_features
    return TimmTrunk(name, net, data_config["mean"], data_config["std"]), feature_dim


def parameter_groups(model: EmbeddingNet, lr: float, head_lr: float | None) -> list[dict]:
    """Backbone and head as separate optimiser groups: the paper trains the new head faster."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    return [
        {"params": backbone, "lr": lr, "name": "backbone"},
        {
            "params": list(model.head.parameters()),
            "lr": head_lr if head_lr is not None else lr,
            "name": "head",
        },
    ]
