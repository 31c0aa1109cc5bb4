"""The BYOL loss equals 2 - 2cos and sums the two directions."""
import torch

from byol_ray.loss import byol_loss, regression_loss


def test_regression_loss_is_normalised_mse_and_two_minus_two_cos():
    g = torch.Generator().manual_seed(0)
    q, z = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    # independent form 1: squared distance of unit vectors
    qn = q / q.norm(dim=1, keepdim=True)
    zn = z / z.norm(dim=1, keepdim=True)
    mse = ((qn - zn) ** 2).sum(dim=1)
    # independent form 2: 2 - 2 cos
    cos = torch.nn.functional.cosine_similarity(q, z, dim=1)
    torch.testing.assert_close(regression_loss(q, z), mse)
    torch.testing.assert_close(regression_loss(q, z), 2 - 2 * cos)


def test_loss_is_scale_invariant_and_zero_for_aligned_vectors():
    q = torch.randn(4, 8)
    assert regression_loss(q, 3.0 * q).abs().max() < 1e-6
    assert torch.allclose(regression_loss(q, -q), torch.full((4,), 4.0))


def test_symmetric_loss_sums_both_directions():
    torch.manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(8, 4) for _ in range(4))
    expected = (2 - 2 * torch.nn.functional.cosine_similarity(p1, z2)).mean() + (
        2 - 2 * torch.nn.functional.cosine_similarity(p2, z1)
    ).mean()
    torch.testing.assert_close(byol_loss(p1, p2, z1, z2), expected)
    # identical predictions and targets: loss 0; opposite: 8 (4 per direction, summed)
    assert byol_loss(p1, p1, p1, p1).item() < 1e-6
    assert abs(byol_loss(p1, p2, -p2, -p1).item() - 8.0) < 1e-5


def test_loss_stops_gradient_into_target_projections():
    p1, p2 = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    z1, z2 = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    byol_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None
