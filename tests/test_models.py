import pytest
import torch

from bench.config import ModelConfig
from bench.models import build_model, parameter_groups


def test_same_seed_gives_identical_initial_weights_whatever_the_global_rng():
    torch.manual_seed(123)
    a = build_model(ModelConfig(), in_channels=1, seed=7)
    torch.rand(1000)  # disturb the global RNG between builds
    b = build_model(ModelConfig(), in_channels=1, seed=7)
    c = build_model(ModelConfig(), in_channels=1, seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_embeddings_are_unit_length_with_the_configured_size():
    model = build_model(ModelConfig(embedding_dim=24), in_channels=1, seed=0)
    out = model(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_frozen_batchnorm_keeps_statistics_and_affine_fixed_while_training():
    model = build_model(ModelConfig(freeze_bn=True), in_channels=1, seed=0)
    bn = model.batchnorms()[0]
    before = (bn.running_mean.clone(), bn.weight.clone())
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.rand(8, 1, 28, 28) * 5).sum().backward()
    optimizer.step()
    assert not bn.training and not bn.weight.requires_grad
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.weight, before[1])
    unfrozen = build_model(ModelConfig(), in_channels=1, seed=0).train()
    unfrozen(torch.rand(8, 1, 28, 28) * 5)
    assert not torch.equal(unfrozen.batchnorms()[0].running_mean, before[0])


def test_resnet18_takes_grey_images():
    """Missing pretrained weights (downloaded, or offline an error) are tested in tests/test_backbones.py."""
    model = build_model(ModelConfig(backbone="resnet18", embedding_dim=16), in_channels=1, seed=0)
    assert model.eval()(torch.rand(2, 1, 32, 32)).shape == (2, 16)


def test_cached_pretrained_weights_are_loaded(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    model = build_model(ModelConfig(backbone="resnet18", pretrained=True), in_channels=3, seed=3)
    torch.testing.assert_close(model.backbone[1].conv1.weight, reference.conv1.weight)


def test_unknown_backbone_lists_available():
    with pytest.raises(ValueError, match="convnet"):
        build_model(ModelConfig(backbone="vgg"), 1, 0)


def test_head_gets_its_own_learning_rate():
    model = build_model(ModelConfig(), 1, 0)
    backbone, head = parameter_groups(model, lr=1e-5, head_lr=5e-5)
    assert backbone["lr"] == 1e-5 and head["lr"] == 5e-5
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
