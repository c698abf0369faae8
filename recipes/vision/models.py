"""SimCLR models: backbones, the 3-layer projector, and the pretext/downstream wrappers.

Both wrappers name the backbone's parameters ``backbone.*``, so a pretext model and a downstream
model hold the same names for θ (what the BiSSL proximal regulariser couples).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock

__all__ = [
    "Downstream",
    "Pretext",
    "SmallResNet",
    "backbone_state",
    "build_backbone",
    "count_parameters",
    "projector",
]


class SmallResNet(nn.Module):
    """A three-stage ResNet (BasicBlocks, widths w, 2w, 4w) for small images on a CPU.

    Output: ``4w`` features after global average pooling.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        )

        def down(cin: int, cout: int) -> nn.Module:
            conv = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(cout))

        self.layers = nn.Sequential(
            BasicBlock(w, w),
            BasicBlock(w, 2 * w, stride=2, downsample=down(w, 2 * w)),
            BasicBlock(2 * w, 4 * w, stride=2, downsample=down(2 * w, 4 * w)),
        )
        self.out_dim = 4 * w

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, 4w)``."""
        return self.layers(self.stem(x)).mean(dim=(2, 3))


def build_backbone(name: str, *, width: int = 16, small_stem: bool = False) -> nn.Module:
    """A randomly initialised backbone with an ``out_dim`` attribute and no classifier.

    ``name``: ``"small-resnet"`` (width ``width``), ``"resnet18"`` or ``"resnet50"`` (torchvision,
    ``fc`` replaced by identity). ``small_stem`` swaps the ResNet stem for a 3x3 convolution
    without max-pooling (for inputs of 32-96 px).
    """
    if name == "small-resnet":
        return SmallResNet(width)
    builders = {"resnet18": resnet18, "resnet50": resnet50}
    if name not in builders:
        raise ValueError(f"unknown backbone {name!r}; choose from small-resnet, resnet18, resnet50")
    net = builders[name](weights=None)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def projector(in_dim: int, dim: int = 256) -> nn.Sequential:
    """SimCLR projection head: Linear(d, 256)-BN-ReLU-Linear(256, 256)-BN-ReLU-Linear(256, 256)."""
    return nn.Sequential(
        nn.Linear(in_dim, dim),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False),
    )


class Pretext(nn.Module):
    """Backbone θ and projector φ_P: ``x -> projector(backbone(x))``."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector(backbone.out_dim, proj_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Projections ``(B, proj_dim)``."""
        return self.projector(self.backbone(x))


class Downstream(nn.Module):
    """Backbone θ and linear head φ_D: ``x -> head(backbone(x))``."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``."""
        return self.head(self.backbone(x))


def backbone_state(model: nn.Module) -> dict[str, Tensor]:
    """The ``backbone.*`` entries of ``model.state_dict()`` with the prefix removed (copies)."""
    return {
        k[len("backbone.") :]: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.startswith("backbone.")
    }


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
