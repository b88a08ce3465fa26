"""Data-parallel context from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

Without those variables everything is a single process. Collectives come from torch.distributed:
gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` as a torch device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r} but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device={spec!r} is not a device; accepted: auto, cpu, cuda, cuda:N") from None


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (idempotent); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
        atexit.register(shutdown)
    return info


def shutdown() -> None:
    """Leave the process group while the interpreter is whole: collect what still refers to it
    first (a DDP model in a reference cycle holds its reducer and the group), then destroy it.
    Left to interpreter finalization, gloo's threads could meet half-torn-down objects and abort
    the process (SIGABRT, "terminate called without an active exception"; seen twice in this
    project's two-rank tests). Registered at exit when a group is joined; callable earlier; idempotent."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_max_int(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest ``value`` over the ranks (every rank must call it)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ---- FSDP2 (TrainConfig.parallel = "fsdp") ----------------------------------------------------
# Checkpoints stay in the single-process format whatever the parallelism: model.pt is the plain
# ``state_dict()`` of the unsharded model and optim.pt the plain ``optimizer.state_dict()`` (state keyed
# by parameter index), so a run saved under FSDP resumes under DDP, in one process, or at another world
# size. torch's full state dicts key the optimizer state by parameter name instead; the two helpers
# below translate, using the optimizer's own parameter order (which is the index order of
# ``optimizer.state_dict()``).


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """``fully_shard`` each of the model's ``fsdp_units()`` (transformer blocks, decoder layers), then
    the root (embeddings, final norm), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.fsdp_units():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Name of each optimizer parameter, in the index order of ``optimizer.state_dict()``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def fsdp_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on rank 0, in the plain format; empty dicts on the
    other ranks. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    by_name = get_optimizer_state_dict(model, optimizer, options=opts)
    if dist.get_rank() != 0:
        return {}, {}
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    groups = optimizer.state_dict()["param_groups"]  # hyperparameters, parameters as indices
    return model_state, {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def fsdp_load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a plain (index-keyed, unsharded) optimizer state into a sharded model's optimizer.
    Every rank passes the full state; each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {"state": {names[int(i)]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
