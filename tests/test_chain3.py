"""Three-level programs against their exact total derivative (nested quadratics, float64).

    θ₃*(θ₂) = argmin ½θ₃ᵀA₃θ₃ − θ₃ᵀB₃θ₂      ⇒ dθ₃/dθ₂ = A₃⁻¹B₃
    θ₂*(λ)  = argmin ½θ₂ᵀA₂θ₂ − θ₂ᵀB₂λ       ⇒ dθ₂/dλ  = A₂⁻¹B₂
    L₁ = ½‖θ₃ − t‖² + c·½‖θ₂ − s‖² + ½μ‖λ‖²
    dL₁/dλ = μλ + B₂ᵀA₂⁻ᵀ[c(θ₂ − s) + B₃ᵀA₃⁻ᵀ(θ₃ − t)]

The mixed terms are constant, so the total derivative holds at the current iterates and
each level's method is exact after enough iterations: CG and Neumann are used at the middle
level and at the bottom.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ziggurat as zg

from helpers import Vec
from ridge import DTYPE, rel_err


def _spd(n: int, cond: float, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    eig = torch.logspace(0, float(torch.log10(torch.tensor(cond))), n, dtype=DTYPE)
    return q @ torch.diag(eig) @ q.T




METHODS: dict[str, Any] = {
    "cg": lambda n: zg.CG(iterations=n),
    "neumann": lambda n: zg.Neumann(iterations=2000),
    "fixed_point": lambda n: zg.FixedPoint(iterations=2000, warm_start=False),
}


@pytest.mark.parametrize("middle", sorted(METHODS))
@pytest.mark.parametrize("bottom", ["cg", "neumann"])
@pytest.mark.parametrize("reads_middle", [False, True], ids=["reads-bottom", "reads-both"])
def test_three_level_chain_total_derivative(middle: str, bottom: str, reads_middle: bool) -> None:
    g = torch.Generator().manual_seed(3)
    n1, n2, n3 = 2, 4, 3
    a2, a3 = _spd(n2, 10.0, g), _spd(n3, 20.0, g)
    b2 = torch.randn(n2, n1, generator=g, dtype=DTYPE)
    b3 = torch.randn(n3, n2, generator=g, dtype=DTYPE)
    t = torch.randn(n3, generator=g, dtype=DTYPE)
    s = torch.randn(n2, generator=g, dtype=DTYPE)
    mu, c = 0.3, (1.0 if reads_middle else 0.0)

    m1 = Vec(torch.randn(n1, generator=g, dtype=DTYPE))
    m2 = Vec(torch.randn(n2, generator=g, dtype=DTYPE))
    m3 = Vec(torch.randn(n3, generator=g, dtype=DTYPE))
    received: list[torch.Tensor] = []
    expected: list[torch.Tensor] = []

    class Top(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            th3, th2, lam = self.bottom(), self.middle(), self.module()
            loss = 0.5 * ((th3 - t) ** 2).sum() + 0.5 * mu * (lam**2).sum()
            if reads_middle:
                loss = loss + 0.5 * c * ((th2 - s) ** 2).sum()
            return loss

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            th3, th2, lam = m3.theta.detach(), m2.theta.detach(), m1.theta.detach()
            inner = torch.linalg.solve(a3.T, th3 - t)
            total = mu * lam + b2.T @ torch.linalg.solve(a2.T, c * (th2 - s) + b3.T @ inner)
            received.append(grads[0].detach().clone())
            expected.append(total)

    def middle_loss(p: zg.Problem, batch: Any) -> torch.Tensor:
        th2, lam = p.module(), p.top()
        return 0.5 * th2 @ a2 @ th2 - th2 @ (b2 @ lam)

    def bottom_loss(p: zg.Problem, batch: Any) -> torch.Tensor:
        th3, th2 = p.module(), p.middle()
        return 0.5 * th3 @ a3 @ th3 - th3 @ (b3 @ th2)

    top = Top("top", m1, torch.optim.SGD(m1.parameters(), lr=0.05))
    mid = zg.ImplicitProblem("middle", m2, torch.optim.SGD(m2.parameters(), lr=0.05),
                             config=zg.Config(type=METHODS[middle](n2)), training_step=middle_loss)
    bot = zg.ImplicitProblem("bottom", m3, torch.optim.SGD(m3.parameters(), lr=0.05),
                             config=zg.Config(type=METHODS[bottom](n3)), training_step=bottom_loss)
    l2u: dict[Any, list[Any]] = {bot: [top]}
    if reads_middle:
        l2u[mid] = [top]
    engine = zg.Engine(
        problems=[top, mid, bot],
        dependencies={"u2l": {top: [mid], mid: [bot]}, "l2u": l2u},
        config=zg.EngineConfig(train_iters=3),
    )
    assert len(top.paths) == (2 if reads_middle else 1)
    engine.run()
    assert len(received) == 3  # unroll 1 at every level: the top steps every iteration
    for got, want in zip(received, expected):
        assert rel_err(got, want) <= 1e-8


def test_three_level_middle_hypergradient_uses_bottom_method() -> None:
    """The middle level's own hypergradient (it reads the bottom) is exact too."""
    g = torch.Generator().manual_seed(4)
    n2, n3 = 3, 5
    a3 = _spd(n3, 15.0, g)
    b3 = torch.randn(n3, n2, generator=g, dtype=DTYPE)
    t = torch.randn(n3, generator=g, dtype=DTYPE)
    m2, m3 = Vec(torch.randn(n2, generator=g, dtype=DTYPE)), Vec(torch.zeros(n3, dtype=DTYPE))
    m1 = Vec(torch.zeros(1, dtype=DTYPE))
    got: list[torch.Tensor] = []
    want: list[torch.Tensor] = []

    class Middle(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.bottom() - t) ** 2).sum() + (self.top() ** 2).sum() * (
                self.module() ** 2
            ).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            th2, th3, lam = m2.theta.detach(), m3.theta.detach(), m1.theta.detach()
            direct = 2 * (lam**2).sum() * th2
            got.append(grads[0].detach().clone())
            want.append(direct + b3.T @ torch.linalg.solve(a3.T, th3 - t))

    top = zg.ImplicitProblem("top", m1, torch.optim.SGD(m1.parameters(), lr=0.01),
                             training_step=lambda p, b: ((p.middle() - 1.0) ** 2).sum())
    mid = Middle("middle", m2, torch.optim.SGD(m2.parameters(), lr=0.01),
                 config=zg.Config(type=zg.CG(iterations=n2)))
    bot = zg.ImplicitProblem(
        "bottom", m3, torch.optim.SGD(m3.parameters(), lr=0.01),
        config=zg.Config(type=zg.CG(iterations=n3)),
        training_step=lambda p, b: 0.5 * p.module() @ a3 @ p.module()
        - p.module() @ (b3 @ p.middle()),
    )
    zg.Engine([top, mid, bot], zg.chain(top, mid, bot), zg.EngineConfig(train_iters=2)).run()
    assert len(got) == 2
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-10
