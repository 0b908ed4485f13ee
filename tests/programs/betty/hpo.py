"""Betty-style bilevel HPO: per-feature weight decay exp(λ) of a linear regression,
tuned on validation loss (CG hypergradient, 3 inner steps per outer step, warm-up)."""

import torch
from _data import batches, linear, out_path, regression, save
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

D = regression()


class Inner(ImplicitProblem):
    def forward(self, x):  # what self.inner(x) computes: here, as the default would
        return self.module(x)

    def training_step(self, batch):
        x, y = batch
        residual = self.module(x).squeeze(-1) - y
        decay = (self.outer.module.weight.exp().squeeze(0) * self.module.weight[0] ** 2).sum()
        return {"loss": 0.5 * (residual**2).mean() + 0.5 * decay, "extra": residual.abs().max()}


class Outer(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return 0.5 * ((self.inner(x).squeeze(-1) - y) ** 2).mean()


class HPOEngine(Engine):
    def validation(self):
        x, y = D["Xv"], D["yv"]
        with torch.no_grad():
            return {"loss": 0.5 * ((self.inner(x).squeeze(-1) - y) ** 2).mean()}


inner_module = linear(4, seed=1)
outer_module = linear(4, 1, seed=2)
torch.nn.init.constant_(outer_module.weight, -1.0)
inner = Inner(
    name="inner",
    module=inner_module,
    optimizer=torch.optim.SGD(inner_module.parameters(), lr=0.1, momentum=0.9),
    train_data_loader=batches(D["X"], D["y"], size=8),
    config=Config(type="cg", cg_iterations=3, cg_alpha=0.5, unroll_steps=3, warmup_steps=4),
)
outer = Outer(
    name="outer",
    module=outer_module,
    optimizer=torch.optim.Adam(outer_module.parameters(), lr=0.05),
    train_data_loader=batches(D["Xv"], D["yv"], size=12),
    config=Config(),
)
engine = HPOEngine(
    problems=[outer, inner],
    config=EngineConfig(train_iters=16, valid_step=4),
    dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
)
engine.run()
assert engine.global_step == 16 and inner.count == 16 and outer.count == 4
save(out_path(), {"inner": inner.module, "outer": outer.module})
