"""Tests of the denoising nets: shapes, zero init, conditioning, gradients, factory and a tiny fit."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lightning_diff.nets import MLP, NoiseEmbedding, SinusoidalEmbedding, UNet, build_net


@pytest.fixture(autouse=True)
def one_thread():
    """Run these small-tensor tests on one thread: intra-op threading buys nothing at this size and
    slows them down several times over when the CPUs are shared with other processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_unet_8() -> UNet:
    return UNet(1, 8, base_channels=32, channel_mult=(1, 2), attn_resolutions=(4,))


def small_unet_32() -> UNet:
    return UNet(3, 32, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))


NET_CASES = [
    pytest.param(lambda: MLP(2, hidden_dim=32, num_layers=2, emb_dim=16), (2,), id="mlp-2"),
    pytest.param(lambda: MLP(10, hidden_dim=32, num_layers=3, emb_dim=16, dropout=0.1), (10,), id="mlp-10"),
    pytest.param(small_unet_8, (1, 8, 8), id="unet-8x8"),
    pytest.param(small_unet_32, (3, 32, 32), id="unet-32x32"),
]


def last_layer(net: nn.Module) -> nn.Module:
    return net.output_proj if isinstance(net, MLP) else net.conv_out


def perturb_last_layer(net: nn.Module, scale: float = 0.1) -> None:
    layer = last_layer(net)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, scale)


@pytest.mark.parametrize(("make", "shape"), NET_CASES)
def test_output_shape_and_zero_init(make, shape) -> None:
    torch.manual_seed(0)
    net = make()
    x = torch.randn(3, *shape)
    out = net(x, torch.tensor([0.0, 10.5, 999.0]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize(("make", "shape"), NET_CASES)
def test_output_depends_on_c_noise(make, shape) -> None:
    torch.manual_seed(0)
    net = make().eval()
    perturb_last_layer(net)
    x = torch.randn(1, *shape).expand(2, *shape)
    out = net(x, torch.tensor([3.0, 700.0]))
    assert not torch.allclose(out[0], out[1])
    # Same c_noise and same input give the same output in eval mode.
    again = net(x, torch.tensor([3.0, 3.0]))
    assert torch.allclose(again[0], again[1])


@pytest.mark.parametrize(("make", "shape"), NET_CASES)
def test_gradients_reach_every_parameter(make, shape) -> None:
    torch.manual_seed(0)
    net = make()
    perturb_last_layer(net)
    loss = net(torch.randn(2, *shape), torch.tensor([1.0, 500.0])).square().mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize(("make", "shape"), NET_CASES)
def test_fractional_negative_and_large_c_noise(make, shape) -> None:
    torch.manual_seed(0)
    net = make().eval()
    perturb_last_layer(net)
    x = torch.randn(4, *shape)
    out = net(x, torch.tensor([0.25, -1.7, 12345.678, 1e6]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    # Integer timesteps and a scalar broadcast over the batch are accepted too.
    assert net(x, torch.tensor([0, 1, 2, 999])).shape == x.shape
    assert torch.allclose(net(x, torch.tensor(5.5)), net(x, torch.full((4,), 5.5)))


def test_sinusoidal_embedding() -> None:
    emb = SinusoidalEmbedding(8)
    out = emb(torch.tensor([0.0, 1.5, 999.0]))
    assert out.shape == (3, 8)
    assert torch.equal(out[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(out[:, :4].square() + out[:, 4:].square(), torch.ones(3, 4))
    assert SinusoidalEmbedding(7)(torch.tensor([2.0])).shape == (1, 7)
    assert list(emb.state_dict()) == []
    assert NoiseEmbedding(16, 64)(torch.rand(5) * 1000).shape == (5, 64)


def test_unet_resolutions() -> None:
    for res in (8, 16, 28, 32, 64):
        net = UNet(1, res, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
        x = torch.randn(1, 1, res, res)
        assert net(x, torch.tensor([10.0])).shape == x.shape


def test_unet_bad_resolution_raises() -> None:
    with pytest.raises(ValueError, match=r"resolution 28 is not divisible by 8"):
        UNet(1, 28, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="resolution 10"):
        UNet(1, 10, channel_mult=(1, 2, 2))


def test_unet_accepts_any_sequence_and_options() -> None:
    net = UNet(
        2,
        8,
        base_channels=12,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[8, 4],
        num_groups=32,
        num_heads=2,
        use_scale_shift_norm=True,
        emb_dim=20,
    )
    perturb_last_layer(net)
    x = torch.randn(2, 2, 8, 8)
    assert net(x, torch.tensor([1.0, 2.0])).shape == x.shape
    with pytest.raises(ValueError, match="num_heads"):
        UNet(1, 8, base_channels=12, channel_mult=(1,), attn_resolutions=(8,), num_heads=5)


def test_determinism() -> None:
    torch.manual_seed(0)
    a = small_unet_8()
    torch.manual_seed(0)
    b = small_unet_8()
    for (name_a, pa), (name_b, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert name_a == name_b
        assert torch.equal(pa, pb)


def small_unet_factory(in_channels: int, resolution: int) -> UNet:
    return UNet(in_channels, resolution, base_channels=8, channel_mult=(1, 2), num_res_blocks=1)


def test_build_net_auto_and_factories() -> None:
    assert isinstance(build_net([2]), MLP)
    assert isinstance(build_net((1, 8, 8), unet=small_unet_factory), UNet)
    net = build_net((5,), kind="mlp", mlp=functools.partial(MLP, hidden_dim=16, num_layers=1))
    assert isinstance(net, MLP) and net.dim == 5
    img = build_net(
        (3, 16, 16), kind="UNet", unet=functools.partial(UNet, base_channels=8, channel_mult=(1, 2))
    )
    assert isinstance(img, UNet) and img.in_channels == 3 and img.resolution == 16


def test_build_net_errors() -> None:
    with pytest.raises(ValueError, match="unknown net kind 'transformer'; valid kinds: auto, mlp, unet"):
        build_net((2,), kind="transformer")
    with pytest.raises(ValueError, match=r"net kind 'mlp' needs vector data, got shape \(1, 8, 8\)"):
        build_net((1, 8, 8), kind="mlp")
    with pytest.raises(ValueError, match=r"'unet' needs image data"):
        build_net((2,), kind="unet")
    with pytest.raises(ValueError, match=r"square images, got shape \(3, 8, 16\)"):
        build_net((3, 8, 16))
    with pytest.raises(ValueError, match=r"'auto' cannot choose"):
        build_net((4, 4))


def test_mlp_overfits_tiny_regression() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    c = torch.rand(64) * 999
    target = torch.sin(c / 100).unsqueeze(-1) * x
    net = MLP(2, hidden_dim=64, num_layers=2, emb_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    initial = (net(x, c) - target).square().mean().item()
    for _ in range(200):
        opt.zero_grad()
        loss = (net(x, c) - target).square().mean()
        loss.backward()
        opt.step()
    final = (net(x, c) - target).square().mean().item()
    assert final < 0.1 * initial
