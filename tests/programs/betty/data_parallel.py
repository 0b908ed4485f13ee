"""Betty-style HPO (per-feature weight decay, CG hypergradient) written to run data
parallel: under torchrun it asks Betty for ``strategy="distributed"`` and each rank takes
its shard (rows rank::world) of every global batch of 12; on one process it runs as is."""

import os

import torch
from _data import batches, linear, out_path, regression, save
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

D = regression(n=48)
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))


def shard(loader):
    return [tuple(t[RANK::WORLD] for t in batch) for batch in loader]


class Inner(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        decay = (self.outer.module.weight.exp().squeeze(0) * self.module.weight[0] ** 2).sum()
        return 0.5 * ((self.module(x).squeeze(-1) - y) ** 2).mean() + 0.5 * decay


class Outer(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return 0.5 * ((self.inner(x).squeeze(-1) - y) ** 2).mean()


inner_module = linear(4, seed=1)
outer_module = linear(4, 1, seed=2)
torch.nn.init.constant_(outer_module.weight, -1.0)
inner = Inner(
    name="inner",
    module=inner_module,
    optimizer=torch.optim.SGD(inner_module.parameters(), lr=0.1, momentum=0.9),
    train_data_loader=shard(batches(D["X"], D["y"], size=12)),
    config=Config(type="cg", cg_iterations=3, unroll_steps=2),
)
outer = Outer(
    name="outer",
    module=outer_module,
    optimizer=torch.optim.Adam(outer_module.parameters(), lr=0.05),
    train_data_loader=shard(batches(D["Xv"], D["yv"], size=12)),
    config=Config(),
)
strategy = "distributed" if "WORLD_SIZE" in os.environ else "default"
engine = Engine(
    problems=[outer, inner],
    config=EngineConfig(train_iters=20, strategy=strategy),
    dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
)
engine.run()
save(f"{out_path()}.rank{RANK}", {"inner": inner.module, "outer": outer.module})
