"""torch's layers as Flax `linen` modules: the same parameter names, shapes and initial
distributions as `nn.Linear` (`weight` (out, in), `x @ weight.T + bias`), `nn.LayerNorm` (biased
variance, `weight` and `bias`) and `nn.Embedding` (a (V, H) `weight`, N(0, 1)), so that the JAX
backend's parameter tree is the canonical `state_dict` (a private helper of backends/jax/model.py)."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _host_init(draw):
    """An initializer that draws on the host with numpy, seeded by the layer's JAX key: drawn with
    `jax.random`, every parameter would be an XLA program compiled on its own (about 0.2 s each on
    a CPU, seconds per model). Flax also calls an initializer under `eval_shape` to check a
    parameter's shape; there only the shape counts."""
    def init(key: jax.Array, shape: Sequence[int]):
        if isinstance(key, jax.core.Tracer):
            return jnp.zeros(shape, jnp.float32)
        return draw(np.random.default_rng(np.asarray(key)), tuple(shape)).astype(np.float32)
    return init


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
        y = x @ self.param("weight", _torch_uniform(fan_in), (self.features, fan_in)).T
        if self.use_bias:
            y = y + self.param("bias", _torch_uniform(fan_in), (self.features,))
        return y


class _LayerNorm(nn.Module):
    """LayerNorm over the last axis as torch computes it: biased variance, `weight` and `bias`."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x.mean(axis=-1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        weight = self.param("weight", _ones, (x.shape[-1],))
        bias = self.param("bias", _zeros, (x.shape[-1],))
        return (x - mean) / jnp.sqrt(var + self.eps) * weight + bias


class _Embedding(nn.Module):
    """torch's `nn.Embedding`: a (V, H) `weight`, N(0, 1) at first, rows looked up by id."""

    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.param("weight", _normal, (self.num_embeddings, self.features)), ids, axis=0)
