"""``gathered()`` under 2-process FSDP2 (``fully_shard``, gloo, CPU), against one unsharded process.

The distributed part runs this file as a script in a subprocess (``python test_grad_sharded.py OUT``,
two ranks by ``torch.multiprocessing.spawn``); each rank writes ``OUT/rank<r>.json`` and the tests
check it. Checked: tied weights stay one Parameter whose gradient equals the unsharded one (both
uses of the weight contribute); a forward through ``functional_call`` inside the block gives the
exact unsharded gradient of an untied model (FSDP2's hooks are off: they would replace the swapped
parameters and the gradient would be None); hooks registered or removed inside the block stay so
after it; an FSDP2 state whose hook handles cannot be found is refused with a typed error and the
model is left unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.slow  # two processes, process-group start-up

TIMEOUT_S = 180


class Tied(nn.Module):
    """``b(tanh(a(x)))`` with ``b.weight`` the same Parameter as ``a.weight`` ([4, 4])."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)  # [5, 4] and [3, 5] weights: dimension 0 does not split evenly over 2 ranks
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, list]:
    """Exact gradients of ``sum(f(x)**2)`` through ``functional_call`` (None where none reached)."""
    params = dict(model.named_parameters())
    loss = torch.func.functional_call(model, params, (x,)).pow(2).sum()
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: None if g is None else g.tolist() for n, g in zip(params, got)}


def _work(rank: int, out: str, port: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_sketch.exceptions import UnsupportedStrategyError
    from lightning_sketch.gradients.sharded import gathered, sharded_parameter_names

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    res: dict = {}

    tied = Tied()
    res["tied_ref"] = _grads(tied, x)
    fully_shard(tied, mesh=mesh)
    with gathered(tied):
        res["tied_same"] = tied.a.weight is tied.b.weight
        res["tied"] = _grads(tied, x)

    mlp = _mlp()
    res["mlp_ref"] = _grads(mlp, x)
    for layer in (mlp[0], mlp[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(mlp, mesh=mesh)
    with gathered(mlp):
        res["mlp"] = _grads(mlp, x)

    calls: list[str] = []
    old = mlp[0].register_forward_hook(lambda *a: calls.append("old"))
    with gathered(mlp):
        new = mlp[0].register_forward_hook(lambda *a: calls.append("new"))
        old.remove()
    mlp(x).sum().backward()
    res["hooks_after"] = list(calls)
    new.remove()
    mlp.zero_grad(set_to_none=True)

    state = fully_shard.state(mlp[2])
    handle = state._pre_forward_hook_handle
    del state._pre_forward_hook_handle  # as if a torch release renamed it
    try:
        with gathered(mlp):
            res["renamed"] = "not refused"
    except UnsupportedStrategyError as err:
        res["renamed"] = str(err)
    finally:
        state._pre_forward_hook_handle = handle
    res["dtensors_after_refusal"] = len(sharded_parameter_names(mlp))
    res["pre_hooks_after_refusal"] = len(mlp[2]._forward_pre_hooks)
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()
    # Leave without interpreter teardown: on a loaded 2-core machine gloo's threads can abort it
    # ("terminate called without an active exception", SIGABRT) after the work is done and written.
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sharded")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, __file__, str(out), port], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    files = [out / f"rank{r}.json" for r in (0, 1)]
    # Each rank writes its file as its last act; a teardown abort after that is not a test failure.
    assert proc.returncode == 0 or all(f.exists() for f in files), proc.stderr[-4000:]
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.parametrize("rank", [0, 1])
def test_tied_weights_stay_one_parameter_with_the_unsharded_gradient(ranks, rank):
    res = ranks[rank]
    assert res["tied_same"] is True
    assert list(res["tied"]) == list(res["tied_ref"]) == ["a.weight"]
    got, ref = torch.tensor(res["tied"]["a.weight"]), torch.tensor(res["tied_ref"]["a.weight"])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert float(ref.norm()) > 0.1


@pytest.mark.parametrize("rank", [0, 1])
def test_functional_gradient_inside_the_block_equals_the_unsharded_one(ranks, rank):
    res = ranks[rank]
    assert list(res["mlp"]) == list(res["mlp_ref"])
    for name, ref in res["mlp_ref"].items():
        assert res["mlp"][name] is not None, name  # FSDP2's pre-forward hook would have cut the graph
        torch.testing.assert_close(torch.tensor(res["mlp"][name]), torch.tensor(ref), rtol=1e-5, atol=1e-6)


def test_hooks_added_or_removed_inside_the_block_stay_so(ranks):
    assert ranks[0]["hooks_after"] == ranks[1]["hooks_after"] == ["new"]


@pytest.mark.parametrize("rank", [0, 1])
def test_missing_fsdp_hook_handles_are_refused_and_leave_the_model_unchanged(ranks, rank):
    res = ranks[rank]
    assert res["renamed"].startswith("gathered(): cannot find the forward hooks FSDP2"), res["renamed"]
    assert f"torch {torch.__version__}" in res["renamed"] and "strategy='ddp'" in res["renamed"]
    assert res["dtensors_after_refusal"] == 4 and res["pre_hooks_after_refusal"] == 1


if __name__ == "__main__":
    torch.multiprocessing.spawn(_work, args=(sys.argv[1], sys.argv[2]), nprocs=2)
