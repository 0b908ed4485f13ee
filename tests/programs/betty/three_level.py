"""Betty-style 3-level program: top tunes the weight decay of middle, whose output
shifts the targets of bottom (bottom: neumann, middle: sama with Adam)."""

import torch
from _data import batches, linear, out_path, regression, save
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

D = regression(seed=5, n=16, dim=3)


class Bottom(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        shift = self.middle.module(x).squeeze(-1)
        return 0.5 * ((self.module(x).squeeze(-1) - y - 0.1 * shift) ** 2).mean() + 0.05 * (
            self.module.weight**2).sum()


class Middle(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        fit = 0.5 * ((self.bottom(x).squeeze(-1) - y) ** 2).mean()
        return fit + 0.5 * self.top.module.weight.exp().squeeze() * (self.module.weight**2).sum()


class Top(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return 0.5 * ((self.bottom(x).squeeze(-1) + 0.1 * self.middle(x).squeeze(-1) - y) ** 2
                      ).mean()


b, m, t = linear(3, seed=6), linear(3, seed=7), linear(1, 1, seed=8)
bottom = Bottom("bottom", Config(type="neumann", neumann_iterations=4, neumann_alpha=0.3), b,
                torch.optim.SGD(b.parameters(), lr=0.2), None, batches(D["X"], D["y"], size=8))
middle = Middle("middle", Config(type="sama", unroll_steps=2), m,
                torch.optim.Adam(m.parameters(), lr=0.02), None, batches(D["X"], D["y"], size=16))
top = Top("top", Config(), t, torch.optim.SGD(t.parameters(), lr=0.5), None,
          batches(D["Xv"], D["yv"], size=16))
engine = Engine(
    [top, middle, bottom],
    EngineConfig(train_iters=8),
    {"u2l": {top: [middle], middle: [bottom]}, "l2u": {bottom: [middle], middle: [top]}},
)
engine.run()
assert [p.leaf for p in (top, middle, bottom)] == [False, False, True]
assert middle.parents == [top] and middle.children == [bottom]
assert [[p.name for p in path] for path in middle.paths] == [["middle", "bottom", "middle"]]
assert (bottom.count, middle.count, top.count) == (8, 8, 4)
save(out_path(), {"top": t, "middle": m, "bottom": b})
