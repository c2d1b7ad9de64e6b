"""Camera encoders: spatial softmax finds a bright spot, random shift is a crop of the padded
image, the observation encoder routes each camera and step to its own features, the ResNet-18
trunk has torchvision's size."""
import pytest
import torch
import torch.nn.functional as F

from vdd_ros.core.config import ConfigError, TrainConfig, VisionConfig, from_dict
from vdd_ros.core.fields import camera_fields, image_side
from vdd_ros.core.vision import ImageEncoder, ObservationEncoder, SpatialSoftmax, random_shift

SIDE = 16
FIELDS = [('eef', 3), ('agentview_image', SIDE * SIDE * 3), ('grip', 2),
          ('wrist_image', SIDE * SIDE * 3)]


def test_spatial_softmax_locates_a_bright_pixel():
    soft = SpatialSoftmax(9, 9)
    with torch.no_grad():
        soft.log_temperature.fill_(-3.0)          # sharp
    maps = torch.zeros(2, 1, 9, 9)
    maps[0, 0, 2, 7] = 10.0                       # row 2, column 7
    maps[1, 0, 8, 0] = 10.0                       # bottom-left corner
    xy = soft(maps).reshape(2, 2)
    grid = torch.linspace(-1, 1, 9)
    assert torch.allclose(xy[0], torch.stack([grid[7], grid[2]]), atol=1e-3)
    assert torch.allclose(xy[1], torch.tensor([-1.0, 1.0]), atol=1e-3)


def test_random_shift_is_a_crop_of_the_padded_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 8, 8)
    assert random_shift(images, 0) is images
    out = random_shift(images, 2, gen)
    assert out.shape == images.shape
    padded = F.pad(images, (2, 2, 2, 2), mode='replicate')
    offsets = []
    for i in range(len(images)):
        found = [(r, c) for r in range(5) for c in range(5)
                 if torch.equal(padded[i, :, r:r + 8, c:c + 8], out[i])]
        assert found, f'image {i} is no crop of its padded original'
        offsets.append(found[0])
    assert len(set(offsets)) > 3                  # independent offsets per image


def test_observation_encoder_without_cameras_is_the_identity():
    enc = ObservationEncoder([('a', 3), ('b', 2)], obs_horizon=2)
    x = torch.randn(4, 10)
    assert enc(x) is x and enc.out_dim == 10 and not list(enc.parameters())


def test_observation_encoder_routes_cameras_and_steps():
    torch.manual_seed(0)
    enc = ObservationEncoder(FIELDS, obs_horizon=2, cfg=VisionConfig(feature_dim=6,
                                                                     keypoints=4))
    enc.eval()
    obs_dim = sum(n for _, n in FIELDS)
    assert enc.step_dim == 5 + 2 * 6 and enc.out_dim == 2 * enc.step_dim
    x = torch.rand(3, 2 * obs_dim)
    y = enc(x)
    assert y.shape == (3, enc.out_dim)
    step0 = x[:, :obs_dim]
    assert torch.equal(y[:, :3], step0[:, :3])                      # eef
    assert torch.equal(y[:, 3:5], step0[:, 3 + SIDE * SIDE * 3:5 + SIDE * SIDE * 3])  # grip
    x2 = x.clone()
    x2[:, obs_dim + 5 + SIDE * SIDE * 3:] = torch.rand(3, SIDE * SIDE * 3)  # step 1's wrist
    changed = (enc(x2) - y).abs().amax(0) > 0
    wrist1 = slice(enc.step_dim + 5 + 6, 2 * enc.step_dim)
    assert changed[wrist1].all() and not changed[:wrist1.start].any()


def test_observation_encoder_augments_only_while_training():
    enc = ObservationEncoder(FIELDS, obs_horizon=1, cfg=VisionConfig(shift=3))
    x = torch.rand(2, sum(n for _, n in FIELDS))
    enc.eval()
    assert torch.equal(enc(x), enc(x))
    enc.train()
    a = enc(x, torch.Generator().manual_seed(1))
    b = enc(x, torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)


def test_resnet18_trunk_matches_torchvision_in_size():
    enc = ImageEncoder(VisionConfig(encoder='resnet18', keypoints=8, feature_dim=16), 64)
    # torchvision's resnet18 without its classifier: 11,176,512 parameters (BatchNorm and
    # GroupNorm have the same affine parameters)
    assert sum(p.numel() for p in enc.trunk.parameters()) == 11_176_512
    assert enc.trunk(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    assert enc(torch.rand(2, 3, 64, 64)).shape == (2, 16)


def test_camera_fields_and_sizes():
    assert camera_fields(FIELDS) == [('agentview_image', SIDE), ('wrist_image', SIDE)]
    assert image_side('x_image', 84 * 84 * 3) == 84
    with pytest.raises(ValueError, match='not a square RGB image'):
        image_side('x_image', 84 * 83 * 3)


@pytest.mark.parametrize('bad, match', [
    ({'encoder': 'vit'}, 'vision.encoder'), ({'shift': -1}, 'vision.shift'),
    ({'feature_dim': 0}, 'vision.feature_dim'), ({'keypoints': 0}, 'vision.keypoints')])
def test_vision_config_is_validated(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, {'vision': bad}, 'train.yaml')
