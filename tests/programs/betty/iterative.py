"""Betty-style iterative (unrolled) program: the outer problem learns a weight decay
by differentiating through 4 unrolled SGD steps of the inner problem."""

import torch
from _data import batches, linear, out_path, regression, save
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem, IterativeProblem

D = regression(seed=9, n=16, dim=3)


class Inner(IterativeProblem):
    def forward(self, x):  # what self.inner(x) computes: here, as the default would
        return self.module(x)

    def training_step(self, batch):
        x, y = batch
        fit = 0.5 * ((self.module(x).squeeze(-1) - y) ** 2).mean()
        return fit + 0.5 * self.outer.module.weight.exp().squeeze() * (
            self.module.weight**2).sum()


class Outer(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return 0.5 * ((self.inner(x).squeeze(-1) - y) ** 2).mean()


i_mod, o_mod = linear(3, seed=10), linear(1, 1, seed=11)
inner = Inner("inner", Config(unroll_steps=4), i_mod, torch.optim.SGD(i_mod.parameters(), lr=0.1),
              None, batches(D["X"], D["y"], size=8))
outer = Outer("outer", Config(first_order=False), o_mod,
              torch.optim.SGD(o_mod.parameters(), lr=0.5), None, batches(D["Xv"], D["yv"], size=16))
engine = Engine([outer, inner], EngineConfig(train_iters=12),
                {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
engine.run()
save(out_path(), {"inner": i_mod, "outer": o_mod})
