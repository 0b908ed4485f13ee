"""The Problem API: training_step results, configure_* hooks, optimizers, schedulers, data,
callbacks, and the hypergradient errors a problem raises."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ziggurat as zg

from helpers import Vec

DTYPE = torch.float64




def half_sq(p: zg.Problem, batch: Any) -> torch.Tensor:
    return 0.5 * (p() ** 2).sum()


def solo(
    name: str = "solo",
    values: tuple[float, ...] = (1.0, -2.0),
    lr: float = 0.5,
    training_step: Any = half_sq,
    cls: type[zg.Problem] = zg.Problem,
    **kw: Any,
) -> zg.Problem:
    module = Vec(list(values))
    return cls(
        name,
        module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=lr),
        training_step=training_step,
        **kw,
    )


def loader(n: int, batch_size: int) -> DataLoader:
    data = torch.arange(n, dtype=DTYPE)
    return DataLoader(TensorDataset(data), batch_size=batch_size, shuffle=False)


# --------------------------------------------------------------------------- training_step
def test_training_step_dict_records_loss_and_metrics() -> None:
    def step(p: zg.Problem, batch: Any) -> dict[str, Any]:
        loss = 0.5 * (p() ** 2).sum()
        return {"loss": loss, "norm": p().detach().norm(), "tag": "x"}

    p = solo(training_step=step)
    engine = zg.Engine([p])
    engine.train_step()
    # loss at θ = (1, -2) before the step
    assert torch.equal(p.last_loss, torch.tensor(2.5, dtype=DTYPE))
    assert p.last_loss is not None and not p.last_loss.requires_grad
    assert set(p.last_metrics) == {"norm", "tag"}
    assert p.last_metrics["tag"] == "x"
    assert torch.equal(p.last_metrics["norm"], torch.tensor([1.0, -2.0], dtype=DTYPE).norm())
    # SGD lr 0.5 on ½‖θ‖²: θ ← θ/2
    assert torch.equal(p.module.theta.detach(), torch.tensor([0.5, -1.0], dtype=DTYPE))


def test_plain_tensor_loss_clears_metrics() -> None:
    calls = {"n": 0}

    def step(p: zg.Problem, batch: Any) -> Any:
        calls["n"] += 1
        loss = 0.5 * (p() ** 2).sum()
        return {"loss": loss, "m": 1} if calls["n"] == 1 else loss

    p = solo(training_step=step)
    engine = zg.Engine([p])
    engine.train_step()
    assert p.last_metrics == {"m": 1}
    engine.train_step()
    assert p.last_metrics == {}
    assert torch.equal(p.last_loss, torch.tensor(0.625, dtype=DTYPE))  # ½(0.25 + 1)


def test_dict_without_loss_is_an_error() -> None:
    p = solo(training_step=lambda p, b: {"total": (p() ** 2).sum(), "acc": 1.0})
    engine = zg.Engine([p])
    with pytest.raises(zg.ZigguratError) as info:
        engine.train_step()
    msg = str(info.value)
    assert "training_step of problem 'solo' returned a dict without a 'loss' key" in msg
    assert "(keys: ['acc', 'total'])" in msg
    assert p.count == 0


@pytest.mark.parametrize(
    ("out", "described"),
    [
        (lambda p: p() ** 2, "got Tensor of shape (2,)"),
        (lambda p: {"loss": p() * 0.0}, "got Tensor of shape (2,)"),
        (lambda p: float((p().detach() ** 2).sum()), "got float"),
        (lambda p: None, "got NoneType"),
    ],
)
def test_non_scalar_loss_is_an_error(out: Any, described: str) -> None:
    p = solo("lvl", training_step=lambda p, b: out(p))
    engine = zg.Engine([p])
    with pytest.raises(zg.ZigguratError) as info:
        engine.train_step()
    msg = str(info.value)
    assert "training_step of problem 'lvl' must return a scalar tensor loss" in msg
    assert described in msg


def test_one_element_loss_is_accepted() -> None:
    p = solo(training_step=lambda p, b: (0.5 * (p() ** 2).sum()).reshape(1, 1))
    zg.Engine([p]).train_step()
    assert torch.equal(p.module.theta.detach(), torch.tensor([0.5, -1.0], dtype=DTYPE))


def test_training_step_kwarg_receives_problem_and_batch() -> None:
    seen: list[tuple[Any, Any]] = []

    def step(problem: zg.Problem, batch: Any) -> torch.Tensor:
        seen.append((problem, batch))
        return half_sq(problem, batch)

    batches = [torch.tensor(1.0), torch.tensor(2.0)]
    p = solo(training_step=step, train_data_loader=batches)
    engine = zg.Engine([p])
    engine.train_step()
    engine.train_step()
    assert [s[0] for s in seen] == [p, p]
    assert [s[1] for s in seen] == batches
    assert p.cur_batch is batches[1]


def test_missing_training_step() -> None:
    module = Vec([1.0])
    p = zg.Problem("bare", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=1))
    engine = zg.Engine([p])
    with pytest.raises(
        NotImplementedError,
        match=r"problem 'bare': subclass Problem and "
        r"define training_step\(self, batch\)",
    ):
        engine.train_step()


# --------------------------------------------------------------------------- configure_* hooks
class Configured(zg.Problem):
    def configure_module(self) -> torch.nn.Module:
        return Vec([4.0, 8.0])

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.module.parameters(), lr=0.5)

    def configure_scheduler(self) -> Any:
        return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)

    def configure_train_data_loader(self) -> Any:
        return [torch.tensor(2.0, dtype=DTYPE), torch.tensor(4.0, dtype=DTYPE)]

    def training_step(self, batch: Any) -> torch.Tensor:
        return 0.5 * ((self() - batch) ** 2).sum()


def test_configure_hooks_fill_in_what_was_not_passed() -> None:
    p = Configured("cfg")
    engine = zg.Engine([p])
    assert isinstance(p.module, Vec)
    assert p.optimizer.param_groups[0]["params"] == [p.module.theta]
    assert isinstance(p.scheduler, torch.optim.lr_scheduler.StepLR)
    engine.train_step()  # batch 2, lr 0.5: θ ← θ − 0.5(θ − 2) = (3, 5)
    assert torch.equal(p.module.theta.detach(), torch.tensor([3.0, 5.0], dtype=DTYPE))
    engine.train_step()  # batch 4, lr 0.25: θ ← θ − 0.25(θ − 4) = (3.25, 4.75)
    assert torch.equal(p.module.theta.detach(), torch.tensor([3.25, 4.75], dtype=DTYPE))
    assert p.optimizer.param_groups[0]["lr"] == 0.125


def test_passed_objects_win_over_configure_hooks() -> None:
    module = Vec([1.0, 1.0])
    opt = torch.optim.SGD(module.parameters(), lr=0.25)
    data = [torch.tensor(0.0, dtype=DTYPE)]
    p = Configured("cfg", module=module, optimizer=opt, train_data_loader=data)
    zg.Engine([p])
    assert p.module is module and p.optimizer is opt and p.train_data_loader is data
    # the scheduler was not passed, so configure_scheduler filled it in (over `opt`)
    assert p.scheduler.optimizer is opt


def test_missing_module_is_a_config_error() -> None:
    p = zg.Problem("nomod", training_step=half_sq)
    with pytest.raises(zg.ConfigError) as info:
        zg.Engine([p])
    assert (info.value.owner, info.value.field, info.value.value) == ("nomod", "module", None)
    assert str(info.value) == (
        "nomod.module=None is not allowed: a torch.nn.Module, or override configure_module()"
    )


def test_module_of_wrong_type_is_a_config_error() -> None:
    p = zg.Problem("bad", module=torch.zeros(2), training_step=half_sq)  # type: ignore
    with pytest.raises(
        zg.ConfigError,
        match=r"^bad\.module='Tensor' is not allowed: a "
        r"torch\.nn\.Module",
    ):
        zg.Engine([p])


def test_missing_optimizer_is_a_config_error() -> None:
    p = zg.Problem("noopt", module=Vec([1.0]), training_step=half_sq)
    with pytest.raises(zg.ConfigError) as info:
        zg.Engine([p])
    assert (info.value.owner, info.value.field) == ("noopt", "optimizer")
    msg = str(info.value)
    assert msg.startswith("noopt.optimizer=None is not allowed")
    assert "override configure_optimizer()" in msg


def test_optimizer_of_wrong_type_is_a_config_error() -> None:
    p = zg.Problem(
        "weird",
        module=Vec([1.0]),
        optimizer="sgd",  # type: ignore[arg-type]
        training_step=half_sq,
    )
    with pytest.raises(
        zg.ConfigError,
        match=r"^weird\.optimizer='str' is not allowed: a "
        r"torch\.optim\.Optimizer",
    ):
        zg.Engine([p])


def test_optimizer_missing_some_trainable_parameters() -> None:
    module = torch.nn.Linear(3, 2).double()
    opt = torch.optim.SGD([module.weight], lr=0.1)  # bias missing
    p = zg.Problem("partial", module=module, optimizer=opt, training_step=half_sq)
    with pytest.raises(zg.ConfigError) as info:
        zg.Engine([p])
    assert (info.value.owner, info.value.field) == ("partial", "optimizer")
    msg = str(info.value)
    assert "an optimizer over all trainable parameters of the module" in msg
    assert "parameters [1] of module.parameters() are not in its param_groups" in msg


def test_frozen_parameters_need_not_be_in_the_optimizer() -> None:
    module = torch.nn.Linear(3, 2).double()
    module.bias.requires_grad_(False)
    opt = torch.optim.SGD([module.weight], lr=0.1)
    p = zg.Problem(
        "frozen",
        module=module,
        optimizer=opt,
        training_step=lambda p, b: p(torch.ones(3, dtype=DTYPE)).sum(),
    )
    bias = module.bias.detach().clone()
    zg.Engine([p]).train_step()
    assert p.trainable_parameters() == [module.weight]
    assert torch.equal(module.bias, bias)


# --------------------------------------------------------------------------- optimizer / scheduler
def test_user_optimizer_is_kept_with_its_groups_and_state() -> None:
    module = torch.nn.Linear(2, 1).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 2.0]], dtype=DTYPE))
        module.bias.fill_(0.5)
    opt = torch.optim.SGD(
        [
            {"params": [module.weight], "lr": 0.1, "name": "weights"},
            {"params": [module.bias], "lr": 0.01, "name": "bias"},
        ],
        lr=1.0,
        momentum=0.9,
    )
    groups = opt.param_groups
    x = torch.tensor([1.0, -1.0], dtype=DTYPE)
    p = zg.Problem("lin", module=module, optimizer=opt, training_step=lambda p, b: p(x).sum())
    engine = zg.Engine([p])
    assert p.optimizer is opt
    assert opt.param_groups is groups
    assert [(g["name"], g["lr"], g["momentum"]) for g in opt.param_groups] == [
        ("weights", 0.1, 0.9),
        ("bias", 0.01, 0.9),
    ]
    assert opt.param_groups[0]["params"][0] is module.weight

    # reference: the same optimizer settings stepped by hand
    ref_module = torch.nn.Linear(2, 1).double()
    ref_module.load_state_dict(module.state_dict())
    ref = torch.optim.SGD(
        [{"params": [ref_module.weight], "lr": 0.1}, {"params": [ref_module.bias], "lr": 0.01}],
        lr=1.0,
        momentum=0.9,
    )
    for _ in range(3):
        engine.train_step()
        ref.zero_grad()
        ref_module(x).sum().backward()
        ref.step()
    assert torch.equal(module.weight, ref_module.weight)
    assert torch.equal(module.bias, ref_module.bias)
    assert torch.equal(
        opt.state[module.weight]["momentum_buffer"], ref.state[ref_module.weight]["momentum_buffer"]
    )
    assert torch.equal(
        opt.state[module.bias]["momentum_buffer"], ref.state[ref_module.bias]["momentum_buffer"]
    )
    assert module.weight.grad is None  # gradients are cleared after each step


def test_scheduler_stepped_once_per_problem_step() -> None:
    module = Vec([1.0, -2.0])
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    p = zg.Problem("s", module=module, optimizer=opt, scheduler=sched, training_step=half_sq)
    engine = zg.Engine([p])
    lrs = []
    for _ in range(5):
        engine.train_step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.1, 0.05, 0.05, 0.025, 0.025]
    assert sched.last_epoch == 5
    assert p.scheduler is sched


def test_scheduler_of_a_lower_steps_with_the_lower_only() -> None:
    upper_m, lower_m = Vec([0.5, 0.25]), Vec([1.0, -2.0])
    upper_opt = torch.optim.SGD(upper_m.parameters(), lr=0.1)
    lower_opt = torch.optim.SGD(lower_m.parameters(), lr=0.1)
    upper_s = torch.optim.lr_scheduler.StepLR(upper_opt, step_size=1, gamma=0.5)
    lower_s = torch.optim.lr_scheduler.StepLR(lower_opt, step_size=1, gamma=0.5)
    upper = zg.ImplicitProblem(
        "upper",
        module=upper_m,
        optimizer=upper_opt,
        scheduler=upper_s,
        training_step=lambda p, b: 0.5 * (p.lower() ** 2).sum(),
    )
    lower = zg.ImplicitProblem(
        "lower",
        module=lower_m,
        optimizer=lower_opt,
        scheduler=lower_s,
        config=zg.Config(unroll_steps=3),
        training_step=lambda p, b: 0.5 * ((p() - p.upper()) ** 2).sum(),
    )
    engine = zg.Engine([upper, lower], zg.chain(upper, lower))
    for _ in range(6):
        engine.train_step()
    assert (lower_s.last_epoch, upper_s.last_epoch) == (6, 2)
    assert lower_opt.param_groups[0]["lr"] == 0.1 * 0.5**6
    assert upper_opt.param_groups[0]["lr"] == 0.1 * 0.5**2


# --------------------------------------------------------------------------- data
class Recorder(zg.Problem):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.batches: list[Any] = []
        self.epoch_ends: list[int] = []  # self.count when epoch_callback ran

    def training_step(self, batch: Any) -> torch.Tensor:
        self.batches.append(batch)
        return 0.5 * (self() ** 2).sum()

    def epoch_callback(self) -> None:
        self.epoch_ends.append(self.count)


def recorder(data: Any) -> Recorder:
    module = Vec([1.0])
    return Recorder(
        "rec",
        module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        train_data_loader=data,
    )


def test_dataloader_cycles_and_calls_epoch_callback() -> None:
    p = recorder(loader(5, 2))  # 3 batches per epoch: [0,1] [2,3] [4]
    engine = zg.Engine([p])
    for _ in range(7):
        engine.train_step()
    seen = [b[0].tolist() for b in p.batches]
    assert seen == [[0.0, 1.0], [2.0, 3.0], [4.0], [0.0, 1.0], [2.0, 3.0], [4.0], [0.0, 1.0]]
    # an epoch ends when the loader is exhausted, i.e. when the 4th and 7th batch are drawn
    assert p.epoch_ends == [3, 6]
    assert p.epoch == 2


def test_two_dataloaders_give_a_tuple_batch() -> None:
    p = recorder([loader(3, 1), loader(4, 2)])  # 3 batches and 2 batches per pass
    engine = zg.Engine([p])
    for _ in range(5):
        engine.train_step()
    assert all(isinstance(b, tuple) and len(b) == 2 for b in p.batches)
    first = [b[0][0].tolist() for b in p.batches]
    second = [b[1][0].tolist() for b in p.batches]
    assert first == [[0.0], [1.0], [2.0], [0.0], [1.0]]
    assert second == [[0.0, 1.0], [2.0, 3.0], [0.0, 1.0], [2.0, 3.0], [0.0, 1.0]]
    # epochs follow the first loader only
    assert p.epoch_ends == [3]
    assert p.epoch == 1


def test_plain_list_of_batches_cycles() -> None:
    a, b = torch.tensor([1.0]), torch.tensor([2.0])
    p = recorder([a, b])
    engine = zg.Engine([p])
    for _ in range(5):
        engine.train_step()
    assert [x is y for x, y in zip(p.batches, [a, b, a, b, a])] == [True] * 5
    assert p.epoch_ends == [2, 4]


def test_no_loader_gives_batch_none() -> None:
    p = recorder(None)
    engine = zg.Engine([p])
    engine.train_step()
    engine.train_step()
    assert p.batches == [None, None]
    assert p.cur_batch is None
    assert p.epoch_ends == [] and p.epoch == 0


def test_empty_loader_is_a_config_error() -> None:
    p = recorder([])
    engine = zg.Engine([p])
    with pytest.raises(zg.ConfigError) as info:
        engine.train_step()
    assert (info.value.owner, info.value.field) == ("rec", "train_data_loader")
    assert "a loader that yields at least one batch" in str(info.value)


def test_non_iterable_loader_is_a_config_error() -> None:
    p = recorder(5)
    with pytest.raises(zg.ConfigError) as info:
        zg.Engine([p])
    assert (info.value.owner, info.value.field, info.value.value) == (
        "rec",
        "train_data_loader",
        "int",
    )
    assert "an iterable of batches" in str(info.value)


def test_get_batch_before_engine() -> None:
    with pytest.raises(
        zg.ZigguratError,
        match=r"problem 'rec' has not been initialized by an "
        r"Engine",
    ):
        recorder(None).get_batch()


# --------------------------------------------------------------------------- callbacks
class Hooked(zg.Problem):
    def __init__(self, *args: Any, replace: str = "none", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.replace = replace
        self.grads_seen: list[list[torch.Tensor]] = []
        self.params_seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def training_step(self, batch: Any) -> torch.Tensor:
        return 0.5 * ((self() - 3.0) ** 2).sum()

    def grad_callback(self, grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
        self.grads_seen.append([g.clone() for g in grads])
        if self.replace == "zero":
            return [torch.zeros_like(g) for g in grads]
        if self.replace == "double":
            return [2 * g for g in grads]
        return None

    def param_callback(self, params: list[torch.Tensor]) -> None:
        self.params_seen.append((list(params), [q.detach().clone() for q in params]))


def hooked(replace: str) -> Hooked:
    module = Vec([1.0, -1.0])
    return Hooked(
        "h", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.5), replace=replace
    )


def test_grad_callback_zeroing_gradients_freezes_parameters() -> None:
    p = hooked("zero")
    engine = zg.Engine([p])
    for _ in range(3):
        engine.train_step()
    assert torch.equal(p.module.theta.detach(), torch.tensor([1.0, -1.0], dtype=DTYPE))
    # it saw the true gradient θ − 3 each time
    assert [g[0].tolist() for g in p.grads_seen] == [[-2.0, -4.0]] * 3
    assert p.count == 3


def test_grad_callback_replacing_gradients() -> None:
    p = hooked("double")
    zg.Engine([p]).train_step()
    # θ − 0.5·2(θ − 3) = 3
    assert torch.equal(p.module.theta.detach(), torch.tensor([3.0, 3.0], dtype=DTYPE))


def test_param_callback_after_each_step() -> None:
    p = hooked("none")
    engine = zg.Engine([p])
    for _ in range(2):
        engine.train_step()
    assert len(p.params_seen) == 2
    for tensors, _ in p.params_seen:
        assert len(tensors) == 1 and tensors[0] is p.module.theta
    # values after the update: θ ← θ − 0.5(θ − 3)
    assert [v[0].tolist() for _, v in p.params_seen] == [[2.0, 1.0], [2.5, 2.0]]


def test_custom_optimizer_step_replaces_optimizer_step() -> None:
    class Manual(zg.Problem):
        def custom_optimizer_step(self) -> None:
            with torch.no_grad():
                for q in self.trainable_parameters():
                    q.sub_(0.25 * q.grad)

    module = Vec([1.0, -1.0])
    opt = torch.optim.SGD(module.parameters(), lr=10.0, momentum=0.9)
    p = Manual("m", module=module, optimizer=opt, training_step=half_sq)
    engine = zg.Engine([p])
    for _ in range(3):
        engine.train_step()
    # θ ← 0.75 θ, exact in binary floating point; the SGD optimizer never stepped
    assert p.module.theta.tolist() == [0.75**3, -(0.75**3)]
    assert len(opt.state) == 0


def test_calling_a_problem_calls_its_module() -> None:
    module = torch.nn.Linear(3, 2).double()
    p = zg.Problem("lin", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=1))
    x = torch.arange(3, dtype=DTYPE)
    assert torch.equal(p(x), module(x))
    assert torch.equal(p(input=x), module(x))


def test_repr_names_problem_and_method() -> None:
    p = solo("named", config=zg.Config(type="cg"))
    assert repr(p) == "Problem(name='named', type='cg')"


# --------------------------------------------------------------------------- hypergradients
def bilevel(
    upper_step: Any,
    lower_step: Any,
    upper_config: zg.Config | None = None,
    lower_config: zg.Config | None = None,
) -> tuple[zg.Engine, zg.ImplicitProblem, zg.ImplicitProblem]:
    um, lm = Vec([0.5, 0.25]), Vec([1.0, -2.0])
    upper = zg.ImplicitProblem(
        "upper",
        module=um,
        optimizer=torch.optim.SGD(um.parameters(), lr=0.1),
        config=upper_config,
        training_step=upper_step,
    )
    lower = zg.ImplicitProblem(
        "lower",
        module=lm,
        optimizer=torch.optim.SGD(lm.parameters(), lr=0.1),
        config=lower_config,
        training_step=lower_step,
    )
    return zg.Engine([upper, lower], zg.chain(upper, lower)), upper, lower


def good_upper(p: zg.Problem, b: Any) -> torch.Tensor:
    return 0.5 * (p.lower() ** 2).sum()


def good_lower(p: zg.Problem, b: Any) -> torch.Tensor:
    return 0.5 * ((p() - p.upper()) ** 2).sum()


def test_grad_callback_of_the_upper_sees_the_hypergradient() -> None:
    seen: list[torch.Tensor] = []

    class Upper(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return good_upper(self, batch)

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            seen.append(grads[0].clone())

    um, lm = Vec([0.5, 0.25]), Vec([1.0, -2.0])
    upper = Upper("upper", module=um, optimizer=torch.optim.SGD(um.parameters(), lr=0.1))
    lower = zg.ImplicitProblem(
        "lower",
        module=lm,
        optimizer=torch.optim.SGD(lm.parameters(), lr=0.1),
        training_step=good_lower,
    )
    engine = zg.Engine([upper, lower], zg.chain(upper, lower))
    engine.train_step()
    # Darts (H⁻¹ ≈ I): hypergradient = −∂²_{λθ}L · ∂L_U/∂θ = θ_lower (after its step)
    theta = lm.theta.detach()
    start = torch.tensor([1.0, -2.0], dtype=DTYPE)
    assert torch.allclose(
        theta, start - 0.1 * (start - torch.tensor([0.5, 0.25], dtype=DTYPE)), rtol=0, atol=1e-15
    )
    assert torch.allclose(seen[0], theta, rtol=1e-9, atol=1e-12)
    assert upper.last_hypergrad_norm == pytest.approx(float(theta.norm()), rel=1e-9)


def test_upper_loss_not_reading_the_lower() -> None:
    engine, upper, lower = bilevel(lambda p, b: 0.5 * (p() ** 2).sum(), good_lower)
    with pytest.raises(zg.HypergradientError) as info:
        engine.train_step()
    msg = str(info.value)
    assert (
        "the loss of problem 'upper' does not depend on the parameters of 'lower', "
        "although l2u says it reads them"
    ) in msg
    assert "use self.lower(...) in training_step without detaching" in msg
    assert (upper.count, lower.count) == (0, 1)


def test_upper_loss_reading_a_detached_lower() -> None:
    engine, _, _ = bilevel(
        lambda p, b: 0.5 * (p.lower().detach() ** 2).sum() + p().sum(), good_lower
    )
    with pytest.raises(
        zg.HypergradientError,
        match=r"'upper' does not depend on the "
        r"parameters of 'lower'",
    ):
        engine.train_step()


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (
            zg.Config(type=zg.Darts(mixed="fd")),
            "the loss of problem 'lower' does not depend on the parameters of 'upper'",
        ),
        (
            zg.Config(type="darts"),
            "∇_θ L of problem 'lower' does not depend on the parameters of 'upper'",
        ),
        (
            zg.Config(type="cg", cg_iterations=2),
            "∇_θ L of problem 'lower' does not depend on the parameters of 'upper'",
        ),
    ],
)
def test_lower_loss_not_using_the_upper(config: zg.Config, fragment: str) -> None:
    engine, upper, _lower = bilevel(
        good_upper, lambda p, b: 0.5 * (p() ** 2).sum(), lower_config=config
    )
    with pytest.raises(zg.HypergradientError) as info:
        engine.train_step()
    msg = str(info.value)
    assert fragment in msg
    assert "'lower'.training_step uses 'upper' without detaching it" in msg
    assert upper.count == 0


# the λ·log(0) term is additive in λ: only the finite difference sees it (the exact mixed
# product ∂²L/∂λ∂θ does not), so these tests use the finite-difference mixed product
FD = zg.Config(type=zg.Darts(mixed="fd"))


def inf_lower(flag: dict[str, bool]) -> Any:
    """½‖θ − λ‖², plus λ·log(0) (∇_λ = −∞) once flag["bad"] is set; ∇_θ stays finite."""

    def step(p: zg.Problem, b: Any) -> torch.Tensor:
        loss = 0.5 * ((p() - p.upper()) ** 2).sum()
        if flag["bad"]:
            loss = loss + (p.upper() * torch.log(torch.zeros((), dtype=DTYPE))).sum()
        return loss

    return step


def test_non_finite_hypergradient_names_problem_and_step() -> None:
    flag = {"bad": False}
    engine, upper, lower = bilevel(good_upper, inf_lower(flag), lower_config=FD)
    engine.train_step()
    engine.train_step()
    before = upper.module.theta.detach().clone()
    assert upper.last_hypergrad_norm is not None and upper.last_hypergrad_norm > 0
    flag["bad"] = True
    with pytest.raises(zg.HypergradientError) as info:
        engine.train_step()
    msg = str(info.value)
    assert "the hypergradient of problem 'upper' at its step 3 is not finite (NaN or Inf" in msg
    assert "the run is stopped" in msg
    assert upper.count == 2
    assert torch.equal(upper.module.theta.detach(), before)  # the bad step was not taken
    assert torch.isfinite(lower.module.theta).all()


def test_non_finite_hypergradient_after_a_non_finite_own_step_names_that_cause() -> None:
    """check_finite checks the hypergradients received, not a problem's own gradient: a NaN
    in the upper's own loss at its step 2 makes its parameters NaN, and the error at step 3
    says the parameters were not finite already instead of advising damping."""
    flag = {"bad": False}

    def upper_step(p: zg.Problem, b: Any) -> torch.Tensor:
        loss = good_upper(p, b)
        return loss + p().sum() * float("nan") if flag["bad"] else loss

    engine, _, _ = bilevel(upper_step, good_lower)
    engine.train_step()
    flag["bad"] = True
    engine.train_step()  # the upper's own gradient is NaN: not checked, the step is taken
    flag["bad"] = False
    with pytest.raises(zg.HypergradientError) as info:
        engine.train_step()
    msg = str(info.value)
    assert "at its step 3 is not finite" in msg
    assert "The parameters of ['upper', 'lower'] are not finite already" in msg
    assert "CG damping" not in msg


def test_an_upper_problem_without_trainable_parameters_is_named() -> None:
    """Every method, implicit or unrolled, names the upper problem that has nothing to
    receive a hypergradient (all its tensors frozen) and the two ways out."""
    for lower_config in (zg.Config(type="darts"), zg.Config(type="cg"),
                         zg.Config(type="neumann")):
        engine, upper, _ = bilevel(good_upper, good_lower, lower_config=lower_config)
        upper.module.theta.requires_grad_(False)
        with pytest.raises(zg.HypergradientError,
                           match=r"problem 'upper' has no trainable parameters .* through "
                                 r"'lower'.*remove the dependency"):
            engine.train_step()
    um, lm = Vec([0.5]), Vec([1.0])
    lower = zg.IterativeProblem("lower", lm, torch.optim.SGD(lm.parameters(), lr=0.1),
                                training_step=lambda p, b: ((p() - p.upper()) ** 2).sum())
    upper = zg.ImplicitProblem("upper", um, torch.optim.SGD(um.parameters(), lr=0.1),
                               training_step=lambda p, b: (p.lower() ** 2).sum())
    engine = zg.Engine([upper, lower], zg.chain(upper, lower),
                       zg.EngineConfig(summary=False, progress="off"))
    um.theta.requires_grad_(False)
    with pytest.raises(zg.HypergradientError, match=r"'upper' has no trainable parameters"):
        engine.train_step()


def test_a_tensor_in_both_theta_and_lambda_is_refused_by_the_methods() -> None:
    """Called directly, a method refuses an objective whose λ holds one of θ's tensors (the
    engine refuses such a program when it is built)."""
    theta = torch.ones(2, dtype=DTYPE, requires_grad=True)
    gain = torch.ones(1, dtype=DTYPE, requires_grad=True)
    obj = zg.InnerObjective([theta], [gain, theta], lambda: (gain * theta ** 2).sum(),
                            name="low", upper_name="up")
    for method in (zg.Darts(), zg.CG(), zg.Neumann(alpha=0.1)):
        with pytest.raises(zg.HypergradientError,
                           match=r"upper_params\[1\] of 'up' are also parameters of 'low'"):
            method(obj, [torch.ones(2, dtype=DTYPE)])


def test_check_finite_false_lets_it_through() -> None:
    flag = {"bad": False}
    engine, upper, _lower = bilevel(
        good_upper, inf_lower(flag), upper_config=zg.Config(check_finite=False),
        lower_config=FD,
    )
    engine.train_step()
    flag["bad"] = True
    assert engine.train_step() == ["lower", "upper"]
    assert upper.count == 2
    assert torch.isnan(upper.module.theta).all()


def test_check_finite_is_the_upper_problems_setting() -> None:
    # check_finite=False on the lower does not silence the upper's check
    flag = {"bad": True}
    engine, _upper, _ = bilevel(
        good_upper, inf_lower(flag),
        lower_config=zg.Config(check_finite=False, type=zg.Darts(mixed="fd")),
    )
    with pytest.raises(
        zg.HypergradientError,
        match=r"problem 'upper' at its step 1 is not "
        r"finite",
    ):
        engine.train_step()
