"""The device mesh, the logical-axis rules, and sharded construction of the train state.

pjit semantics: arrays are `jax.Array`s with `NamedSharding`s on one ("data", "fsdp", "tensor")
mesh; `jax.jit` gets explicit in/out shardings. Model code names axes logically (model.py) and
`LOGICAL_RULES` is the only place that says which mesh axis each name lives on.
"""
from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Parameters: `embed` is split over fsdp (ZeRO-3 style), the head /
# mlp / vocab dimensions over tensor (Megatron style). Activations: batch over data x fsdp,
# head / mlp / vocab dimensions over tensor, the residual stream's embed dimension replicated.
LOGICAL_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("layers", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); at most one may be -1, meaning "the remaining devices"."""
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{axis} must be a positive size or -1, got {size}")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product "
                             f"{fixed} ({sizes})")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} but there are "
                         f"{num_devices} devices ({sizes})")
    return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """jax.make_mesh places devices topology-aware (ICI rings on TPU, NVLink islands on GPU).
    Axes are "auto": XLA propagates shardings from the explicit in/out shardings and the model's
    logical constraints (pjit semantics)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """Mesh and logical rules in scope, so the model's logical constraints resolve while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split over the data-parallel axes (data x fsdp) along their first dimension."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh: Mesh):
    """NamedShardings for a tree of flax `LogicallyPartitioned` boxes (abstract or real)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def optimizer_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_shardings, mesh: Mesh):
    """Each copy of the parameter tree inside the optimizer state (Adam's mu, nu) is sharded like
    the parameters; everything else (step counts) is replicated."""
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding))


def shard_host_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Assembles a global jax.Array from this process' rows (each process reads its own shard)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
