"""One LARS step equals a hand-computed update, with biases and norm parameters excluded."""
import math

import torch
from torch import nn

from byol_ray.lars import LARS, param_groups


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def test_one_lars_step_matches_hand_computed_update():
    lin = nn.Linear(2, 1)
    bn = nn.BatchNorm1d(1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0]]))   # ||w|| = 5
        lin.bias.copy_(torch.tensor([0.5]))
    model = nn.Sequential(lin, bn)
    wd, lr, eta, mom = 0.1, 0.5, 1e-3, 0.9
    opt = LARS(param_groups([model], wd), lr=lr, momentum=mom, eta=eta)
    grads = {"w": [1.0, -2.0], "b": [0.25], "gamma": [0.3], "beta": [-0.7]}
    lin.weight.grad = torch.tensor([grads["w"]])
    lin.bias.grad = torch.tensor(grads["b"])
    bn.weight.grad = torch.tensor(grads["gamma"])
    bn.bias.grad = torch.tensor(grads["beta"])
    opt.step()

    # hand computation, weight: u = g + wd*w; trust = eta*||w||/||u||; m = u*trust; w -= lr*m
    w = [3.0, 4.0]
    u = [g + wd * x for g, x in zip(grads["w"], w)]
    trust = eta * _norm(w) / _norm(u)
    expected_w = [x - lr * trust * ui for x, ui in zip(w, u)]
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([expected_w]))
    # excluded params: plain momentum SGD, no weight decay, no trust ratio
    torch.testing.assert_close(lin.bias.detach(), torch.tensor([0.5 - lr * 0.25]))
    torch.testing.assert_close(bn.weight.detach(), torch.tensor([1.0 - lr * 0.3]))
    torch.testing.assert_close(bn.bias.detach(), torch.tensor([0.0 + lr * 0.7]))

    # second step: heavy-ball momentum m = 0.9 m + u' (trust recomputed at the new weights)
    g2 = [0.5, 0.5]
    lin.weight.grad = torch.tensor([g2])
    for p in (lin.bias, bn.weight, bn.bias):
        p.grad = torch.zeros_like(p)
    m1 = [trust * ui for ui in u]
    w1 = expected_w
    u2 = [g + wd * x for g, x in zip(g2, w1)]
    trust2 = eta * _norm(w1) / _norm(u2)
    m2 = [mom * a + trust2 * b for a, b in zip(m1, u2)]
    expected_w2 = [x - lr * m for x, m in zip(w1, m2)]
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([expected_w2]))
    # bias keeps moving on momentum alone: 0.5 - lr*0.25 - lr*(0.9*0.25 + 0)
    torch.testing.assert_close(lin.bias.detach(), torch.tensor([0.5 - lr * 0.25 - lr * 0.9 * 0.25]))


def test_trust_ratio_is_one_when_a_norm_is_zero():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    opt = LARS(param_groups([lin], 0.0), lr=1.0, momentum=0.0)
    lin.weight.grad = torch.tensor([[1.0, 2.0]])
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([[-1.0, -2.0]]))


def test_param_groups_exclude_every_bias_and_norm_parameter():
    from byol_ray.byol import build_byol
    from byol_ray.encoders import build_encoder

    online, _ = build_byol(build_encoder("resnet18"), projector_hidden_dim=32, projector_dim=8,
                           predictor_hidden_dim=32, num_classes=10)
    groups = {g["name"]: g for g in param_groups([online], 1e-6)}
    excluded = {id(p) for p in groups["bias_and_norm"]["params"]}
    regular = {id(p) for p in groups["regular"]["params"]}
    assert groups["bias_and_norm"]["weight_decay"] == 0.0 and not groups["bias_and_norm"]["lars_adaptation"]
    for name, module in online.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            if pname == "bias" or is_norm:
                assert id(p) in excluded, f"{name}.{pname} must be excluded"
            else:
                assert id(p) in regular, f"{name}.{pname} must be regular"
    assert len(excluded) + len(regular) == len(list(online.parameters()))
