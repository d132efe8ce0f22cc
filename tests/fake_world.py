"""A fake world for device tests: rank 0 of a process group that sends nothing, on a device that holds no data.

Why: CI has no GPU, and on a CPU every tensor lives on one device, so a tensor made without the device it meets (the
bug that crashed the first CUDA evaluation) passes every CPU test. On the meta device such a mix raises ("Tensor on
device cpu is not on the expected device meta!") where CUDA would. torch's fake process group (its collectives
return at once) lets the sharded code paths run in one process at any world size; here every tensor handed to a
collective must also be on the device under test, as NCCL requires. The other ranks are copies of rank 0: object
collectives return rank 0's object for every rank.

Meta tensors hold no values, so a read to the host (`item`, `tolist`, `float`, `cpu`) gives zeros here: tests on
this device check where tensors are, never the numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed import device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

DEVICE = torch.device("meta")
TENSOR_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_to_all_single",
    "reduce_scatter_tensor",
    "broadcast",
)


def _zeros(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(t.shape, dtype=t.dtype)


def _host_read(real: Callable) -> Callable:
    """`real` for tensors that hold values; zeros (a CPU tensor, or its Python value) for meta tensors."""

    def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return real(_zeros(self) if self.device == DEVICE else self, *args, **kwargs)

    return read


def _on_device(name: str, real: Callable) -> Callable:
    """A collective that refuses tensors off the device under test (NCCL takes only CUDA tensors)."""

    def collective(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
        for t in tensors:
            assert t.device == DEVICE, f"dist.{name} got a tensor on {t.device}, not on {DEVICE}"
        try:
            return real(*args, **kwargs)
        except (
            NotImplementedError
        ):  # torch < 2.7 has no meta kernels for c10d's ops; the fake group sends nothing
            return _Sent() if kwargs.get("async_op") else None

    return collective


class _Sent:
    """The handle of an async collective the fake group has already finished."""

    def wait(self, timeout: Any = None) -> bool:
        return True


def _all_gather_object(object_list: list, obj: Any, group: Any = None) -> None:
    object_list[:] = [obj] * len(object_list)


def _gather_object(obj: Any, object_gather_list: list | None = None, dst: int = 0, **_: Any) -> None:
    if object_gather_list is not None:
        object_gather_list[:] = [obj] * len(object_gather_list)


@contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """Within: rank 0 of a fake process group of `world_size` ranks, with the checks of the module docstring."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in ("item", "tolist", "cpu", "__float__"):
                patch.setattr(torch.Tensor, name, _host_read(getattr(torch.Tensor, name)))
            for name in TENSOR_COLLECTIVES:
                patch.setattr(dist, name, _on_device(name, getattr(dist, name)))
            patch.setattr(dist, "all_gather_object", _all_gather_object)
            patch.setattr(dist, "gather_object", _gather_object)
            mesh_env = getattr(device_mesh, "_mesh_resources", None)
            if mesh_env is not None:  # torch 2.9's DTensor cost model asks the device module (none for meta)
                patch.setattr(mesh_env, "num_devices_per_host", lambda device_type: world_size)
            yield
    finally:
        dist.destroy_process_group()
