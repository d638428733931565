"""torch's layers as Flax `linen` modules: the same parameter names, shapes and initial
distributions as `nn.Linear` (`weight` (out, in), `x @ weight.T + bias`), `nn.LayerNorm` (biased
variance, `weight` and `bias`) and `nn.Embedding` (a (V, H) `weight`, N(0, 1)), so that the JAX
backend's parameter tree is the canonical `state_dict` (a private helper of backends/jax/model.py)."""
from __future__ import annotations

import contextlib
import math
import zlib
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


# While `_draw_params` traces a module's init, each parameter's draw and shape, by its path in the
# parameter tree (`_param` notes them); None otherwise.
_DRAWS: list[dict | None] = [None]
# Set inside `_shapes_only()`: `_draw_params` gives the parameters' shapes, none drawn. A checkpoint's
# loader builds its model so and draws only the heads the checkpoint lacks: drawing MiniLM's 22M
# parameters only to overwrite them with the file's would cost ~0.3 s of numpy.
_SHAPES_ONLY = [False]


@contextlib.contextmanager
def _shapes_only() -> Iterator[None]:
    _SHAPES_ONLY[0] = True
    try:
        yield
    finally:
        _SHAPES_ONLY[0] = False


def _host_init(draw):
    """An initializer whose values `draw(rng, shape)` makes on the host with numpy (`_draw_params`).
    Drawn with `jax.random` inside flax's init, every parameter would be an XLA program compiled on
    its own; traced, as `_draw_params` and `jax.eval_shape` run the init, it gives zeros: only the
    shape counts there."""
    def init(key: jax.Array, shape: Sequence[int]):
        return jnp.zeros(shape, jnp.float32)
    init.draw = draw
    return init


def _param(module: nn.Module, name: str, init, shape: Sequence[int]) -> jax.Array:
    """`module.param(name, init, shape)`, noted for `_draw_params` while it traces the init."""
    if _DRAWS[0] is not None and module.is_initializing():
        _DRAWS[0][(*module.path, name)] = (init.draw, tuple(shape))
    return module.param(name, init, shape)


def _draw_params(module: nn.Module, key: jax.Array, *inputs: jax.ShapeDtypeStruct) -> dict:
    """`module`'s parameters for inputs of these shapes: the tree from `jax.eval_shape` of its
    init (traced, nothing compiled), each parameter then drawn on the host by its own numpy
    generator, seeded by `key` and the parameter's path. (flax's `lazy_init` computes what it can
    on concrete values op by op, each op an XLA program compiled on first use: ~1 s for MiniLM's
    heads, ~3 s for its whole model.)"""
    _DRAWS[0] = draws = {}
    try:
        shapes = jax.eval_shape(lambda *xs: module.init(key, *xs)["params"], *inputs)
    finally:
        _DRAWS[0] = None
    if _SHAPES_ONLY[0]:  # `jax.ShapeDtypeStruct`s, for a checkpoint to fill
        return shapes
    seed = [int(v) for v in np.asarray(key).ravel()]  # the backend's keys are raw uint32 arrays

    def value(path, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        names = tuple(p.key for p in path)
        draw, shape = draws[names]
        rng = np.random.default_rng([*seed, zlib.crc32("/".join(names).encode())])
        return draw(rng, shape).astype(np.float32)
    return jax.tree_util.tree_map_with_path(value, shapes)


def _torch_uniform(fan_in: int):
    """torch's default for Linear weights and biases, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the same
    distributions as the torch backend's freshly built layers."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    return _host_init(lambda rng, shape: rng.uniform(-bound, bound, shape))


# N(0, 1): torch's Embedding and the book's pos_embedding
_normal = _host_init(lambda rng, shape: rng.standard_normal(shape))
_ones = _host_init(lambda rng, shape: np.ones(shape))
_zeros = _host_init(lambda rng, shape: np.zeros(shape))


class _Linear(nn.Module):
    """torch's `nn.Linear`: `weight` (out, in), `bias` (out,), x @ weight.T + bias."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        y = x @ _param(self, "weight", _torch_uniform(fan_in), (self.features, fan_in)).T
        if self.use_bias:
            y = y + _param(self, "bias", _torch_uniform(fan_in), (self.features,))
        return y


class _LayerNorm(nn.Module):
    """LayerNorm over the last axis as torch computes it: biased variance, `weight` and `bias`."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x.mean(axis=-1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        weight = _param(self, "weight", _ones, (x.shape[-1],))
        bias = _param(self, "bias", _zeros, (x.shape[-1],))
        return (x - mean) / jnp.sqrt(var + self.eps) * weight + bias


class _Embedding(nn.Module):
    """torch's `nn.Embedding`: a (V, H) `weight`, N(0, 1) at first, rows looked up by id."""

    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(_param(self, "weight", _normal, (self.num_embeddings, self.features)), ids, axis=0)
