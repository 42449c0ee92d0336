"""The smp model zoo: every family builds offline, forwards, has the thesis-sized parameter count."""

import pytest
import segmentation_models_pytorch as smp
import torch

from aerialseg.core.errors import AerialsegError
from aerialseg.models import count_parameters, create_model, get_spec, list_models
from aerialseg.models.zoo import load_lite0_encoder, lite0_weights_path

# Parameter counts (millions) of smp 0.6.0 with 5 classes; thesis table in brackets where it has one.
EXPECTED_M = {
    "pspnet_resnet18": 0.85,  # used parameters only [thesis 2.1]
    "segformer_b0": 3.7,  # [3.7]
    "segformer_b3": 44.6,  # [47.2]
    "segformer_b5": 82.0,  # [84.6]
    "fpn_resnet50": 26.1,  # [26.9]
    "unet_resnet50": 32.5,  # [32.5]
    "upernet_convnext_tiny": 37.0,  # [37.0]
    "upernet_convnext_base": 97.7,  # [101.9]
    "deeplabv3plus_resnet18": 12.3,
    "deeplabv3plus_resnet50": 26.7,
    "unet_efficientnet_lite0": 5.2,
    "unet_efficientnet_lite0_slim": 0.92,
}



def test_all_zoo_models_are_registered():
    assert set(EXPECTED_M) <= set(list_models())


@pytest.mark.parametrize("name", sorted(EXPECTED_M))
def test_builds_forwards_and_counts(name):
    kwargs = {"pretrained_encoder": False} if name.startswith("unet_efficientnet_lite0") else {}
    model = create_model(name, **kwargs).eval()
    spec = get_spec(name)
    assert spec.family and spec.tile_size == 512 and spec.tile_size % spec.pad_multiple == 0
    with torch.no_grad():  # any multiple of pad_multiple works, not only powers of two
        out = model(torch.zeros(1, 3, 64, 96))
    assert out.shape == (1, 5, 64, 96)
    assert count_parameters(model) / 1e6 == pytest.approx(EXPECTED_M[name], rel=0.03)


def test_pspnet_drops_only_unused_layers():
    """Removing layer3/layer4 (encoder_depth 3) keeps the function of smp's full PSPNet."""
    torch.manual_seed(0)
    ours = create_model("pspnet_resnet18").eval()
    full = smp.PSPNet("resnet18", encoder_weights=None, classes=5).eval()
    assert count_parameters(full) > 10 * count_parameters(ours)
    missing, unexpected = full.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("encoder.layer3", "encoder.layer4")) for k in missing)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), full(x), atol=1e-5)
    assert get_spec("pspnet_resnet18").pad_multiple == 8


def test_lite0_loads_the_offline_imagenet_weights():
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    model = create_model("unet_efficientnet_lite0")
    encoder = model.encoder.model.state_dict()
    assert torch.equal(encoder["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(encoder["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])
    assert not torch.allclose(encoder["bn1.running_var"], torch.ones_like(encoder["bn1.running_var"]))
    random_init = create_model("unet_efficientnet_lite0", pretrained_encoder=False)
    assert not torch.equal(random_init.encoder.model.conv_stem.weight, model.encoder.model.conv_stem.weight)
    spec = get_spec("unet_efficientnet_lite0")
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)


def test_lite0_rejects_files_that_do_not_fit(tmp_path):
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    shuffled = dict(reversed(list(source.items())))
    torch.save(shuffled, tmp_path / "shuffled.pth")
    encoder = create_model("unet_efficientnet_lite0", pretrained_encoder=False).encoder.model
    with pytest.raises(AerialsegError, match="does not fit"):
        load_lite0_encoder(encoder, tmp_path / "shuffled.pth")
    torch.save(dict(list(source.items())[:-20]), tmp_path / "short.pth")
    with pytest.raises(AerialsegError, match="encoder tensors"):
        load_lite0_encoder(encoder, tmp_path / "short.pth")
    with pytest.raises(AerialsegError, match="3 input bands"):
        create_model("unet_efficientnet_lite0", in_channels=4)
    assert create_model("unet_efficientnet_lite0", in_channels=4, pretrained_encoder=False)


def test_slim_student_is_the_default_encoder_cut_at_stride_16_with_its_imagenet_weights():
    """unet_efficientnet_lite0_slim: <= 1/5 of the default's parameters, its encoder a prefix of the default's."""
    slim, full = create_model("unet_efficientnet_lite0_slim"), create_model("unet_efficientnet_lite0")
    assert count_parameters(slim) * 5 <= count_parameters(full)
    slim_sd, full_sd = slim.encoder.model.state_dict(), full.encoder.model.state_dict()
    assert len(slim_sd) < len(full_sd)
    assert all(torch.equal(tensor, full_sd[key]) for key, tensor in slim_sd.items())  # ImageNet, not random
    assert get_spec("unet_efficientnet_lite0_slim").pad_multiple == 16
