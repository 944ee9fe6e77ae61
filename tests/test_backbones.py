"""Backbones a user has: any timm model as `timm/<name>`, and torchvision's ImageNet weights fetched into the
torch hub cache by torchvision's own download (offline: an error naming the URL and the cache path)."""

from __future__ import annotations

import email.message
import io
import re
from urllib.error import URLError
from urllib.response import addinfourl

import numpy as np
import pytest
import torch

from bench.config import ModelConfig
from bench.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bench.models import build_model
from tests.helpers import omniglot_experiment, tiny_omniglot


def leave_one_out_recall_at_1(emb: torch.Tensor, labels: np.ndarray) -> float:
    sims = (emb @ emb.T).double()
    sims.fill_diagonal_(-np.inf)
    return float(np.mean(labels[sims.argmax(1).numpy()] == labels))


def test_a_small_timm_model_trains_one_omniglot_epoch_end_to_end(tmp_path):
    timm = pytest.importorskip("timm")
    from bench.train import train_and_evaluate
    from bench.train.checkpoint import model_from_checkpoint

    exp = omniglot_experiment(
        tmp_path,
        "model.backbone=timm/test_vit",  # timm's own tiny ViT (0.3M parameters), for seconds on a CPU
        "data.image_size=32",
        "train.epochs=1",
        "optim.lr_decay_epochs=[]",
    )
    # 8 classes x 8 grey images (the trunk repeats them to three channels): an epoch of 4 batches
    bundle = tiny_omniglot(train_classes=8, val_classes=4, test_classes=6, image_size=32, per_class=8)
    initial = build_model(exp.model, in_channels=1, seed=exp.train.seed)
    result = train_and_evaluate(exp, device="cpu", bundle=bundle, progress=False)

    trained, _ = model_from_checkpoint(result.checkpoint)
    assert isinstance(trained.backbone.net, timm.models.VisionTransformer)
    with torch.no_grad():  # the head sits on the timm model's own pooled features
        assert trained.backbone.net(torch.zeros(1, 3, 32, 32)).shape == (1, trained.head.in_features)
    before = initial.backbone.net.patch_embed.proj.weight
    assert not torch.equal(trained.backbone.net.patch_embed.proj.weight, before), (
        "the timm trunk did not train"
    )
    test = bundle.tests[0].query
    with torch.no_grad():
        emb = trained(torch.stack([test[i][0] for i in range(len(test))]))
    assert result.test_metrics["test/recall_at_1"] == pytest.approx(
        leave_one_out_recall_at_1(emb, test.labels)
    )


def test_the_timm_trunk_feeds_the_model_its_own_normalisation():
    timm = pytest.importorskip("timm")
    model = build_model(ModelConfig(backbone="timm/test_vit", embedding_dim=8), in_channels=3, seed=0).eval()
    own = timm.models.get_pretrained_cfg("test_vit")
    assert own.mean != IMAGENET_MEAN  # a model trained with other statistics than the data pipeline's
    raw = torch.rand(2, 3, *own.input_size[1:])
    as_the_pipeline_gives_it = (raw - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    as_the_model_was_trained = (raw - torch.tensor(own.mean).view(3, 1, 1)) / torch.tensor(own.std).view(
        3, 1, 1
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.backbone(as_the_pipeline_gives_it), model.backbone.net(as_the_model_was_trained)
        )


def test_a_fixed_size_timm_model_names_the_image_size_it_needs():
    pytest.importorskip("timm")
    model = build_model(ModelConfig(backbone="timm/vit_tiny_patch16_224"), in_channels=3, seed=0)
    with pytest.raises(ValueError, match=r"takes 224x224 images, got 32x32: set data.image_size=224"):
        model(torch.rand(2, 3, 32, 32))


def test_an_unknown_timm_model_is_named():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"timm has no model 'resnet_nope'"):
        build_model(ModelConfig(backbone="timm/resnet_nope"), in_channels=3, seed=0)


# torchvision's download: torch.hub.load_state_dict_from_url -> download_url_to_file -> urlopen (torch.hub's)


def resnet18_weights():
    import torchvision

    return torchvision.models.ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty torch hub cache: <TORCH_HOME>/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub" / "checkpoints"


def serve(monkeypatch, payload: bytes | None) -> list[str]:
    """Replace the network under torch.hub: `payload` as the response, or None for no network. Returns the
    URLs requested."""
    requested = []

    def urlopen(request, *args, **kwargs):
        requested.append(request.full_url)
        if payload is None:
            raise URLError("[Errno -3] Temporary failure in name resolution")
        headers = email.message.Message()
        headers["Content-Length"] = str(len(payload))
        return addinfourl(io.BytesIO(payload), headers, request.full_url, 200)

    monkeypatch.setattr(torch.hub, "urlopen", urlopen)
    return requested


def state_dict_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_offline_pretrained_weights_fail_naming_the_url_and_the_cache_path(hub_cache, monkeypatch):
    url = resnet18_weights().url
    requested = serve(monkeypatch, None)
    with pytest.raises(FileNotFoundError) as error:
        build_model(ModelConfig(backbone="resnet18", pretrained=True), in_channels=3, seed=0)
    message = str(error.value)
    assert requested == [url]  # the download was tried
    assert url in message and str(hub_cache / url.rsplit("/", 1)[-1]) in message
    assert "model.pretrained=false" in message and "Temporary failure in name resolution" in message
    assert list(hub_cache.iterdir()) == []


def test_missing_pretrained_weights_are_downloaded_into_the_hub_cache(hub_cache, monkeypatch):
    import torchvision

    url = resnet18_weights().url
    torch.manual_seed(5)
    served = torchvision.models.resnet18(weights=None).state_dict()
    requested = serve(monkeypatch, state_dict_bytes(served))
    # the served file is not the real one: torchvision's hash check (the hash is in the file name) refuses it
    with pytest.raises(RuntimeError, match="invalid hash value"):
        build_model(ModelConfig(backbone="resnet18", pretrained=True), in_channels=3, seed=0)
    assert requested == [url] and list(hub_cache.iterdir()) == []
    # with the hash check off, the same download lands in the cache and becomes the backbone's weights
    monkeypatch.setattr(torch.hub, "HASH_REGEX", re.compile(r"(?!)"))
    model = build_model(ModelConfig(backbone="resnet18", pretrained=True), in_channels=3, seed=0)
    assert requested == [url, url] and (hub_cache / url.rsplit("/", 1)[-1]).is_file()
    torch.testing.assert_close(model.backbone[1].conv1.weight, served["conv1.weight"])
    # once cached, it is read from the cache: no network needed
    serve(monkeypatch, None)
    again = build_model(ModelConfig(backbone="resnet18", pretrained=True), in_channels=3, seed=1)
    torch.testing.assert_close(again.backbone[1].layer4[1].conv2.weight, served["layer4.1.conv2.weight"])
