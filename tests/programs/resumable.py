"""A bilevel (or unrolled) program with checkpoints, used by the resume tests.

    python resumable.py CKPT_DIR OUT_FILE [--resume] [--kill-at N] [--unrolled]

Runs 30 iterations with checkpoints every 4; with --kill-at N the process sends itself
SIGKILL right after iteration N (no cleanup runs); at the end the final parameters of every
problem are saved to OUT_FILE.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import ziggurat as zg


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    resume = "--resume" in sys.argv
    unrolled = "--unrolled" in sys.argv
    kill_at = int(sys.argv[sys.argv.index("--kill-at") + 1]) if "--kill-at" in sys.argv else -1
    torch.manual_seed(0)
    x, y = torch.randn(80, 8), torch.randint(0, 3, (80,))  # 5 batches: checkpoints mid-epoch
    xv, yv = torch.randn(56, 8), torch.randint(0, 3, (56,))  # 4 batches
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=16, shuffle=True)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(32, 3))
    weighter = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def inner_loss(p: zg.Problem, batch: Any) -> torch.Tensor:
        bx, by = batch
        losses = F.cross_entropy(p(bx), by, reduction="none")
        w = torch.sigmoid(p.outer(losses.detach().unsqueeze(1))).squeeze(1)
        return (w * losses).mean()

    def outer_loss(p: zg.Problem, batch: Any) -> torch.Tensor:
        bx, by = batch
        return F.cross_entropy(p.inner(bx), by)

    inner_opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    if unrolled:
        inner: zg.Problem = zg.IterativeProblem(
            "inner", net, inner_opt, train_data_loader=train, training_step=inner_loss,
            config=zg.Config(type="reverse", unroll_steps=3))
    else:
        inner = zg.ImplicitProblem(
            "inner", net, inner_opt, train_data_loader=train, training_step=inner_loss,
            scheduler=torch.optim.lr_scheduler.StepLR(inner_opt, step_size=5, gamma=0.7),
            config=zg.Config(type=zg.FixedPoint(iterations=3, alpha=0.1), unroll_steps=2))
    outer = zg.ImplicitProblem("outer", weighter,
                               torch.optim.SGD(weighter.parameters(), lr=0.1, momentum=0.9),
                               train_data_loader=val, training_step=outer_loss)

    class Killable(zg.Engine):
        def train_step(self) -> list[str]:
            stepped = super().train_step()
            if self.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return stepped

    engine = Killable([outer, inner], zg.chain(outer, inner), zg.EngineConfig(
        train_iters=30, checkpoint_dir=ckpt, checkpoint_step=4, keep_last=2, resume=resume,
        summary=False, progress="off"))
    engine.run()
    torch.save({"inner": net.state_dict(), "outer": weighter.state_dict(),
                "inner_opt": inner_opt.state_dict(), "global_step": engine.global_step}, out)


if __name__ == "__main__":
    main()
