"""``ziggurat.backward.grad`` against ``torch.autograd.grad``: the same tensors bit for bit
on the plain cases it runs itself, torch's own errors and overrides on every other case
(which it hands to torch.autograd.grad), and the engine called directly where it should be."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ziggurat import backward
from ziggurat.backward import grad


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many calls ran the engine directly and how many went to torch.autograd.grad."""
    if not backward._HAS_ENGINE:
        pytest.skip("this torch has no torch.autograd.graph._engine_run_backward, so grad is "
                    "torch.autograd.grad (test_a_torch_without_the_engine_function_...)")
    count = {"direct": 0, "torch": 0}

    def counting(key: str, real: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(real)
        def call(*args: Any, **kwargs: Any) -> Any:
            count[key] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(torch.autograd.graph, "_engine_run_backward",
                        counting("direct", torch.autograd.graph._engine_run_backward))
    monkeypatch.setattr(torch.autograd, "grad", counting("torch", torch.autograd.grad))
    yield count


def _model(dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Linear, torch.Tensor,
                                                         torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).to(dtype)
    return model, torch.randn(8, 5, dtype=dtype), torch.randn(8, 3, dtype=dtype)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _same(ours: tuple[Any, ...], theirs: tuple[Any, ...]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if b is None:
            assert a is None
        else:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _errors(call: Callable[..., Any], *args: Any) -> str:
    """The error ``call(*args)`` raises, as "Type: message"."""
    with pytest.raises(Exception) as info:
        call(*args)
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_scalar_loss_gradients_equal_torch_bit_for_bit(dtype: torch.dtype,
                                                      paths: dict[str, int]) -> None:
    model, x, y = _model(dtype)
    params = list(model.parameters())
    ours = grad(_loss(model, x, y), params)
    paths["direct"] = paths["torch"] = 0
    _same(ours, torch.autograd.grad(_loss(model, x, y), params))
    assert paths == {"direct": 0, "torch": 1}
    paths["torch"] = 0
    grad(_loss(model, x, y), params)
    assert paths == {"direct": 1, "torch": 0}


def test_create_graph_second_derivatives_equal_torch(paths: dict[str, int]) -> None:
    model, x, y = _model()
    params = list(model.parameters())
    g_ours = grad(_loss(model, x, y), params, create_graph=True)
    g_torch = torch.autograd.grad(_loss(model, x, y), params, create_graph=True)
    _same(tuple(g.detach() for g in g_ours), tuple(g.detach() for g in g_torch))
    v = [torch.randn_like(p) for p in params]
    # a vector-Jacobian product with given output gradients (H v), retained, then again
    hv_ours = grad(g_ours, params, v, retain_graph=True)
    hv_again = grad(g_ours, params, v)
    hv_torch = torch.autograd.grad(g_torch, params, v)
    _same(hv_ours, hv_torch)
    _same(hv_again, hv_torch)
    assert paths["direct"] == 3
    # the graph was released by the last call without retain_graph, as torch's would be
    assert "a second time" in _errors(grad, g_ours, params, v)


def test_unused_inputs_and_outputs_that_do_not_require_grad(paths: dict[str, int]) -> None:
    model, x, y = _model()
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    inputs = [*model.parameters(), unused]
    ours = grad(_loss(model, x, y), inputs, allow_unused=True)
    assert ours[-1] is None
    _same(ours, torch.autograd.grad(_loss(model, x, y), inputs, allow_unused=True))
    assert paths["direct"] == 1
    # without allow_unused, and for a loss that does not require grad: torch's own errors
    for call in (
        lambda g: g(_loss(model, x, y), inputs),
        lambda g: g(_loss(model, x, y).detach(), inputs),
        lambda g: g(torch.zeros((), dtype=torch.float64), [unused]),
    ):
        assert _errors(call, grad) == _errors(call, torch.autograd.grad)
    # an output that does not require grad beside one that does: torch's error too
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    pair = lambda g: g(((w ** 2).sum(), torch.zeros(())), [w])  # noqa: E731
    assert _errors(pair, grad) == _errors(pair, torch.autograd.grad)


def test_cases_it_does_not_prepare_itself_get_torch_errors(paths: dict[str, int]) -> None:
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    cases: list[Callable[[Callable[..., Any]], Any]] = [
        lambda g: g(w * 2, [w]),  # implicit gradient of a non-scalar output
        lambda g: g(w * 2, [w], [torch.ones(2, dtype=torch.float64)]),  # wrong shape
        lambda g: g((w * 2).to(torch.complex128), [w],  # complex output, real gradient
                    [torch.ones(3, dtype=torch.float64)]),
        lambda g: g((w * 2).sum(), []),  # no inputs
        lambda g: g([w.sum(), w.sum()], [w], [None]),  # fewer gradients than outputs
    ]
    for case in cases:
        paths["direct"] = paths["torch"] = 0
        ours = _errors(case, grad)
        assert paths == {"direct": 0, "torch": 1}
        assert ours == _errors(case, torch.autograd.grad)
    # a 1-element output that is not 0-dim: torch's implicit gradient
    n = (w.sum() * 2).reshape(1)
    _same(grad(n, [w], retain_graph=True), torch.autograd.grad(n, [w]))


class _Recording(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class _Logged(torch.Tensor):
    seen: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_modes_and_subclasses_see_torch_autograd_grad(
        paths: dict[str, int]) -> None:
    model, x, y = _model()
    params = list(model.parameters())
    loss = _loss(model, x, y)
    with _Recording() as mode:
        ours = grad(loss, params, retain_graph=True)
    assert "grad" in mode.seen and paths["direct"] == 0
    _same(ours, torch.autograd.grad(loss, params))
    w = torch.ones(3, dtype=torch.float64).as_subclass(_Logged).requires_grad_()
    _Logged.seen.clear()
    out = grad((w * w).sum(), [w])
    assert "grad" in _Logged.seen and paths["direct"] == 0
    assert torch.equal(out[0].as_subclass(torch.Tensor), torch.full((3,), 2.0,
                                                                    dtype=torch.float64))


def test_inputs_and_outputs_in_every_form_torch_takes(paths: dict[str, int]) -> None:
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    loss = lambda: (w ** 2).sum() * u.sum()  # noqa: E731
    # a single tensor as the inputs (not its rows), lists and tuples: direct
    _same(grad(loss(), w), torch.autograd.grad(loss(), w))
    _same(grad([loss()], (w, u)), torch.autograd.grad([loss()], (w, u)))
    _same(grad((w * u,), [w], torch.ones(3, dtype=torch.float64)),
          torch.autograd.grad((w * u,), [w], torch.ones(3, dtype=torch.float64)))
    assert paths["direct"] == 3
    # a dict of inputs and a gradient edge: torch.autograd.grad's (same results; a torch
    # that takes no dict of inputs, 2.11 say, gives the same error)
    paths["direct"] = paths["torch"] = 0
    try:
        theirs = torch.autograd.grad(loss(), {"w": w, "u": u})  # type: ignore[arg-type]
    except RuntimeError:
        assert (_errors(grad, loss(), {"w": w, "u": u})
                == _errors(torch.autograd.grad, loss(), {"w": w, "u": u}))
        calls = 3  # the test's two calls of torch.autograd.grad, and ours through it
    else:
        ours = grad(loss(), {"w": w, "u": u})  # type: ignore[arg-type]
        assert isinstance(ours, dict) and ours.keys() == theirs.keys()
        _same(tuple(ours.values()), tuple(theirs.values()))
        calls = 2
    edge = torch.autograd.graph.get_gradient_edge(w)
    _same(grad(loss(), edge), torch.autograd.grad(loss(), edge))
    assert paths == {"direct": 0, "torch": calls + 2}


def test_argument_kinds_torch_accepts_beyond_the_plain_ones(paths: dict[str, int]) -> None:
    """Found in review: ``allow_unused=None`` (torch's default), a generator of output
    gradients and a non-iterable one go to torch.autograd.grad, with its results and
    errors."""
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    cases: list[Callable[[Callable[..., Any]], Any]] = [
        lambda g: g((x * 2).sum(), [x], allow_unused=None),
        lambda g: g(x * 2, x, (t for t in [torch.ones(3, dtype=torch.float64)])),
        lambda g: g(x * 2, [x], map(torch.ones_like, [x])),
    ]
    for case in cases:
        _same(case(grad), case(torch.autograd.grad))
    for case in [lambda g: g((x * 2).sum(), [x, unused], allow_unused=None),
                 lambda g: g(x * 2, [x], 5)]:
        assert _errors(case, grad) == _errors(case, torch.autograd.grad)
    assert paths["direct"] == 0


def test_under_torch_compile_the_call_is_torch_autograd_grads() -> None:
    """While torch.compile traces, ``grad`` is torch.autograd.grad (which dynamo knows)."""
    def step(x: torch.Tensor) -> torch.Tensor:
        w = x.detach().requires_grad_()
        with torch.enable_grad():
            (g,) = grad((w ** 3).sum(), [w])
        return g

    def torch_step(x: torch.Tensor) -> torch.Tensor:
        w = x.detach().requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad((w ** 3).sum(), [w])
        return g

    import torch._dynamo

    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch's dynamo does not trace torch.autograd.grad")
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        torch._dynamo.reset()
        try:
            torch.compile(torch_step, backend="eager", fullgraph=True)(x)
        except torch._dynamo.exc.Unsupported as e:  # e.g. torch 2.11: requires_grad_()
            pytest.skip(f"this torch's dynamo cannot trace the step with torch.autograd.grad "
                        f"either ({str(e).splitlines()[0]})")
        torch._dynamo.reset()
        # one graph, as with torch.autograd.grad itself (the engine call would break it)
        compiled = torch.compile(step, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), 3 * x ** 2)


def test_a_torch_without_the_engine_function_uses_torch_autograd_grad(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backward, "_HAS_ENGINE", False)
    model, x, y = _model()
    params = list(model.parameters())
    _same(grad(_loss(model, x, y), params), torch.autograd.grad(_loss(model, x, y), params))
