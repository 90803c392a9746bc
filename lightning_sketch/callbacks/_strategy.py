"""Strategy checks shared by the callbacks (at ``setup``, by type, so that subclasses are caught)."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

from lightning_sketch.exceptions import UnsupportedStrategyError

__all__ = ["check_model_parallel"]


def check_model_parallel(strategy: Strategy, who: str) -> bool:
    """Whether ``strategy`` is FSDP2 (``ModelParallelStrategy`` with ``tensor_parallel_size=1``).

    The callbacks read whole parameters under FSDP2 (``gradients.sharded.gathered``); tensor-parallel
    layers compute on DTensor activations, which per-example gradients and HVPs cannot differentiate.

    Raises:
        UnsupportedStrategyError: for a ``ModelParallelStrategy`` whose tensor-parallel size is > 1.
    """
    if not isinstance(strategy, ModelParallelStrategy):
        return False
    mesh = strategy.device_mesh
    tp = mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    if tp > 1:
        raise UnsupportedStrategyError(
            f"{who} supports ModelParallelStrategy only as FSDP2 (fully_shard) with tensor_parallel_size=1, "
            f"got tensor_parallel_size={tp}: tensor-parallel layers compute on DTensor activations, which "
            f"it cannot differentiate. Use ModelParallelStrategy(data_parallel_size=<number of processes>, "
            f"tensor_parallel_size=1) with fully_shard in configure_model, or strategy='ddp'."
        )
    return True
