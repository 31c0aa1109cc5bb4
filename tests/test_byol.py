"""Model contracts: shapes, the target never gets gradients, EMA exact at tau = 0 and 1."""
import pytest
import torch

from byol_ray.byol import build_byol, update_target
from byol_ray.encoders import build_encoder


def _nets(encoder="tiny", **kw):
    torch.manual_seed(0)
    return build_byol(build_encoder(encoder, cifar_stem=True), projector_hidden_dim=64, projector_dim=16,
                      predictor_hidden_dim=64, num_classes=10, **kw)


@pytest.mark.parametrize("name,dim", [("tiny", 128), ("small", 256), ("resnet18", 512)])
def test_encoder_and_heads_shapes(name, dim):
    online, target = _nets(name)
    x = torch.randn(4, 3, 32, 32)
    out = online(x, x.flip(-1))
    assert online.encoder(x).shape == (4, dim)
    assert out["prediction1"].shape == out["prediction2"].shape == (4, 16)
    assert out["logits"].shape == (4, 10)
    assert target(x).shape == (4, 16)


def test_resnet50_feature_dim_and_cifar_stem():
    enc = build_encoder("resnet50", cifar_stem=True)
    assert enc.feature_dim == 2048 and enc.conv1.stride == (1, 1) and isinstance(enc.maxpool, torch.nn.Identity)
    assert build_encoder("resnet50").conv1.kernel_size == (7, 7)


def test_target_is_a_copy_and_never_receives_gradients():
    online, target = _nets()
    for a, b in zip(target.ema_parameters(), [*online.encoder.parameters(), *online.projector.parameters()]):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    x = torch.randn(4, 3, 32, 32)
    out = online(x, x)
    z = target(x)
    assert not z.requires_grad
    (out["prediction1"].sum() + z.sum()).backward()
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert all(p.grad is not None for p in online.predictor.parameters())


def test_classifier_does_not_backprop_into_encoder():
    online, _ = _nets()
    out = online(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    out["logits"].sum().backward()
    assert all(p.grad is None for p in online.encoder.parameters())


def _perturb(online):
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))


def test_ema_tau_one_keeps_target_and_tau_zero_copies_online():
    online, target = _nets()
    before = [p.clone() for p in target.ema_parameters()]
    _perturb(online)
    update_target(target, online, tau=1.0)
    assert all(torch.equal(a, b) for a, b in zip(target.ema_parameters(), before))
    update_target(target, online, tau=0.0)
    online_params = [*online.encoder.parameters(), *online.projector.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(target.ema_parameters(), online_params))


def test_ema_intermediate_tau_matches_formula_and_skips_bn_buffers():
    online, target = _nets()
    xi = [p.clone() for p in target.ema_parameters()]
    buffers = [b.clone() for b in target.buffers()]
    _perturb(online)
    with torch.no_grad():
        for b in online.buffers():
            if b.dtype.is_floating_point:
                b.add_(1.0)
    update_target(target, online, tau=0.9)
    theta = [*online.encoder.parameters(), *online.projector.parameters()]
    for new, old, th in zip(target.ema_parameters(), xi, theta):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * th)
    assert all(torch.equal(a, b) for a, b in zip(target.buffers(), buffers))


def test_views_are_normalised_separately():
    """BN statistics per view: online(v1, v2) differs from a forward of the concatenated batch."""
    online, _ = _nets()
    v1, v2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32) + 2.0
    separate = online(v1, v2)["prediction1"]
    joint = online.predictor(online.projector(online.encoder(torch.cat([v1, v2]))))[:8]
    assert not torch.allclose(separate, joint, atol=1e-4)
    alone = online.predictor(online.projector(online.encoder(v1)))
    torch.testing.assert_close(separate, alone)


def test_no_predictor_ablation_uses_identity():
    online, _ = _nets(use_predictor=False)
    x = torch.randn(4, 3, 32, 32)
    out = online(x, x)
    torch.testing.assert_close(out["prediction1"], out["projection1"])
