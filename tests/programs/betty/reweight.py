"""Betty-style data reweighting (Meta-Weight-Net): a meta net maps each sample's
(detached) loss to a weight; darts hypergradient with engine-wide roll back."""

import torch
import torch.nn.functional as F
from _data import DTYPE, batches, linear, noisy_labels, out_path, save
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

D = noisy_labels()


class MetaNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([0.5], dtype=DTYPE))
        self.shift = torch.nn.Parameter(torch.tensor([0.0], dtype=DTYPE))

    def forward(self, losses):
        return torch.sigmoid(self.scale * losses + self.shift)


class Classifier(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        losses = F.binary_cross_entropy_with_logits(self.module(x).squeeze(-1), y,
                                                    reduction="none")
        weights = self.meta(losses.detach())
        return (weights * losses).mean()


class Meta(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.classifier(x).squeeze(-1), y)


clf_module = linear(3, seed=3, bias=True)
meta_module = MetaNet()
classifier = Classifier(
    "classifier", Config(type="darts", darts_alpha=0.01), clf_module,
    torch.optim.SGD(clf_module.parameters(), lr=0.3), None,
    batches(D["X"], D["y"], size=8),
)
meta = Meta(
    "meta", Config(), meta_module, torch.optim.SGD(meta_module.parameters(), lr=1.0), None,
    batches(D["Xv"], D["yv"], size=16),
)
engine = Engine(
    [classifier, meta],
    EngineConfig(train_iters=10, roll_back=True),
    {"u2l": {meta: [classifier]}, "l2u": {classifier: [meta]}},
)
engine.run()
save(out_path(), {"classifier": clf_module, "meta": meta_module})
