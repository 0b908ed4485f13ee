"""Ridge regression with a per-feature penalty: the closed-form hypergradient (float64).

L_in(θ, λ) = ‖Xθ − y‖²/(2n) + ½ Σ_i exp(λ_i) θ_i²,  L_out(θ) = ‖X_v θ − y_v‖²/(2m).
H = XᵀX/n + diag(e^λ), θ* = H⁻¹Xᵀy/n, ∂²_{λθ}L_in = diag(e^λ ⊙ θ), v = X_vᵀ(X_vθ − y_v)/m,
dL_out/dλ = −diag(e^λ ⊙ θ*) H⁻¹ v.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

import ziggurat as zg

DTYPE = torch.float64


@dataclass
class Ridge:
    X: Tensor
    y: Tensor
    Xv: Tensor
    yv: Tensor
    lam: Tensor

    def to(self, device: torch.device | str) -> Ridge:
        """The same problem with every tensor on ``device``."""
        return Ridge(*(getattr(self, f.name).to(device) for f in fields(self)))

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def hessian(self) -> Tensor:
        return self.X.T @ self.X / self.n + torch.diag(self.lam.exp())

    def theta_star(self) -> Tensor:
        return torch.linalg.solve(self.hessian(), self.X.T @ self.y / self.n)

    def v(self, theta: Tensor) -> Tensor:
        return self.Xv.T @ (self.Xv @ theta - self.yv) / self.Xv.shape[0]

    def inner_loss(self, theta: Tensor, lam: Tensor) -> Tensor:
        r = self.X @ theta - self.y
        return 0.5 * (r @ r) / self.n + 0.5 * (lam.exp() * theta**2).sum()

    def outer_loss(self, theta: Tensor) -> Tensor:
        r = self.Xv @ theta - self.yv
        return 0.5 * (r @ r) / self.Xv.shape[0]

    def implicit_hypergrad(self, theta: Tensor) -> Tensor:
        """−diag(e^λ θ) H⁻¹ v(θ): the exact hypergradient when θ = θ*."""
        return -(self.lam.exp() * theta) * torch.linalg.solve(self.hessian(), self.v(theta))

    def mixed(self, theta: Tensor, x: Tensor) -> Tensor:
        """∂²_{λθ} L_in · x."""
        return self.lam.exp() * theta * x

    def objective(self, theta: Tensor, lam: Tensor, **kw: object) -> zg.InnerObjective:
        return zg.InnerObjective([theta], [lam], lambda: self.inner_loss(theta, lam), **kw)


def fit_on(batch: tuple[Tensor, Tensor], theta: Tensor) -> Tensor:
    """‖xθ − y‖²/(2n) on a batch (x, y): L_out, and the data part of L_in."""
    x, y = batch
    res = x @ theta - y
    return 0.5 * (res @ res) / x.shape[0]


def inner_loss_on(batch: tuple[Tensor, Tensor], theta: Tensor, lam: Tensor) -> Tensor:
    """L_in on a batch: ‖xθ − y‖²/(2n) + ½ Σ_i exp(λ_i) θ_i²."""
    return fit_on(batch, theta) + 0.5 * (lam.exp() * theta**2).sum()


def make_ridge(condition: float, dim: int = 6, n: int = 40, seed: int = 0) -> Ridge:
    """A ridge problem whose Hessian H has condition number ``condition`` (at λ as built)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DTYPE))
    lam = torch.full((dim,), -1.0, dtype=DTYPE) + 0.1 * torch.randn(dim, generator=g,
                                                                     dtype=DTYPE)
    # eigenvalues of XᵀX/n chosen so that H = XᵀX/n + diag(e^λ) has the wanted condition:
    # pick H's spectrum first for λ constant, then solve for the data spectrum.
    lam = torch.full((dim,), float(lam.mean()), dtype=DTYPE)
    base = float(lam.exp()[0])
    h_eigs = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), dim, dtype=DTYPE)
    h_eigs = h_eigs * base * 1.5
    data_eigs = h_eigs - base  # > 0 since h_eigs >= 1.5·base
    u, _ = torch.linalg.qr(torch.randn(n, dim, generator=g, dtype=DTYPE))
    X = (n**0.5) * u @ torch.diag(data_eigs.sqrt()) @ q.T
    theta_true = torch.randn(dim, generator=g, dtype=DTYPE)
    y = X @ theta_true + 0.1 * torch.randn(n, generator=g, dtype=DTYPE)
    Xv = torch.randn(n // 2, dim, generator=g, dtype=DTYPE)
    yv = Xv @ theta_true + 0.1 * torch.randn(n // 2, generator=g, dtype=DTYPE)
    return Ridge(X, y, Xv, yv, lam)


def condition_number(r: Ridge) -> float:
    eig = torch.linalg.eigvalsh(r.hessian())
    return float(eig.max() / eig.min())


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def krylov_solution(h: Tensor, v: Tensor, k: int) -> Tensor:
    """argmin over the Krylov space K_k(H, v) of ½xᵀHx − vᵀx: what k CG steps must return."""
    basis = [v]
    for _ in range(k - 1):
        basis.append(h @ basis[-1])
    q, _ = torch.linalg.qr(torch.stack(basis, dim=1))
    return q @ torch.linalg.solve(q.T @ h @ q, q.T @ v)
