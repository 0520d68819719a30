"""xross.methods.discriminator: MEAL V2's shape, its targets, and the sign of its gradient in the student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xross.errors import XrossError
from xross.methods.discriminator import Discriminator, default_hidden, reverse_gradient


def test_shape_is_meal_v2s_linear_relu_stack() -> None:
    d = Discriminator(1000)
    linears = [m for m in d.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1000, 125), (125, 15), (15, 2)]
    assert [type(m) for m in d.net] == [nn.Linear, nn.ReLU] * 3  # a ReLU after each layer, the last too
    assert default_hidden(10) == [8, 8]
    assert [m.out_features for m in Discriminator(10, [6, 4]).net if isinstance(m, nn.Linear)] == [6, 4, 2]
    with pytest.raises(XrossError, match="unknown discriminator mode 'gan'"):
        Discriminator(10, mode="gan")


def _pair(mode: str) -> tuple[Discriminator, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)  # a draw whose final ReLU passes most outputs (MEAL V2's last ReLU can zero them all)
    d = Discriminator(6, [16, 16], mode=mode).double()
    g = torch.Generator().manual_seed(3)
    student = (3 * torch.randn(4, 6, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = (3 * torch.randn(4, 6, generator=g, dtype=torch.float64)).requires_grad_()
    return d, student, teacher


def test_targets_student_one_zero_teacher_zero_one() -> None:
    d, student, teacher = _pair("joint")
    terms = d.loss(student, teacher)
    out = d(torch.cat([student, teacher]))
    target = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4, dtype=torch.float64)
    assert torch.allclose(terms["d_loss"], F.binary_cross_entropy_with_logits(out, target), rtol=1e-6)
    swapped = F.binary_cross_entropy_with_logits(out, target.flip(1))
    assert not torch.allclose(terms["d_loss"], swapped)
    expected_acc = 100.0 * (out.argmax(1) == target.argmax(1)).double().mean()
    assert torch.allclose(terms["d_acc"].double(), expected_acc)


def test_joint_gives_the_student_the_discriminators_sign_and_grl_the_reverse() -> None:
    grads = {}
    for mode in ("joint", "grl"):
        d, student, teacher = _pair(mode)
        d.loss(student, teacher)["d_loss"].backward()
        grads[mode] = (student.grad.clone(), [p.grad.clone() for p in d.parameters()], teacher.grad)
    # the gradient of the loss itself with respect to the student's logits, with no reversal
    d, student, teacher = _pair("joint")
    out = d(torch.cat([student, teacher.detach()]))
    target = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4, dtype=torch.float64)
    (true_grad,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(out, target), student)
    assert true_grad.abs().sum() > 0
    assert torch.allclose(grads["joint"][0], true_grad)  # joint: the student descends the discriminator loss too
    assert torch.allclose(grads["grl"][0], -true_grad)  # grl: the student ascends it
    for a, b in zip(grads["joint"][1], grads["grl"][1]):  # the discriminator learns the same either way
        assert torch.equal(a, b)
    assert grads["joint"][2] is None and grads["grl"][2] is None  # the teachers get nothing


def test_reverse_gradient_is_identity_forward() -> None:
    x = torch.randn(3, requires_grad=True)
    y = reverse_gradient(x)
    assert torch.equal(y, x)
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -2.0))
