"""The fast path's replacements for MXNet 1.9.1 operators whose CPU backward is slow: the same math,
other operators (`set_fused_attention` switches them on with the fused attention; the book's path and
hybridized graphs keep MXNet's own).

MXNet 1.9.1 differentiates LayerNorm on the CPU with its general kernel: four `broadcast::Reduce`
passes, each as slow as the matrix multiplies around it (on the bert.small shape, batch 512, the
backward took about 17x the forward; MXNet's later sources hand LayerNorm to oneDNN instead). A
broadcast add's backward reduces the same way, which the position embedding's gradient (summed over
the batch) pays. Here the row and column sums are matrix-vector products (`np.dot` with a vector of
ones), which run at memory speed.
"""
from __future__ import annotations

import os

import mxnet as mx
from mxnet import autograd, np, npx
from mxnet.gluon import nn


# Under MXNet's shared-pool engine (MXNET_ENGINE_TYPE=ThreadedEngine, not the default) a Python
# Function's backward deadlocks once a few steps are queued (measured); there MXNet's own operators run.
ENGINE_ALLOWS = os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice") != "ThreadedEngine"


def in_use(fast_backward: bool) -> bool:
    """Whether a block with `fast_backward` set differentiates with the operators here now: while
    autograd records, under an engine that runs Python Functions."""
    return fast_backward and ENGINE_ALLOWS and autograd.is_recording()


def _column_sum(x: np.ndarray) -> np.ndarray:
    """(N, C) -> (C,): the sum over rows, as one matrix-vector product."""
    return np.dot(np.ones((1, x.shape[0]), dtype=x.dtype, ctx=x.ctx), x).reshape(-1)


class _LayerNorm(autograd.Function):
    """LayerNorm over the last axis: MXNet's forward operator (`npx.layer_norm`, which also returns
    each row's mean and standard deviation), and the backward of the same formula,
        dx = (g - mean(g) - xhat * mean(g * xhat)) / std,  g = dy * gamma,  xhat = (x - mean) / std,
        dgamma = sum over rows of dy * xhat,  dbeta = sum over rows of dy,
    with every sum a matrix-vector product."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
        y, mean, std = npx.layer_norm(x, gamma, beta, axis=-1, eps=self.eps, output_mean_var=True)
        self.save_for_backward(x, gamma, mean, std)
        return y

    def backward(self, dy):
        x, gamma, mean, std = self.saved_tensors
        H = x.shape[-1]
        dy = dy.as_np_ndarray().reshape(-1, H)  # Function hands legacy NDArrays in and takes them back
        rstd = 1.0 / std.reshape(-1, 1)
        xhat = (x.reshape(-1, H) - mean.reshape(-1, 1)) * rstd
        dy_xhat = dy * xhat
        g = dy * gamma
        g_mean = np.dot(g, np.full((H, 1), 1.0 / H, dtype=g.dtype, ctx=g.ctx))  # (N, 1)
        g_xhat_mean = np.dot(dy_xhat, (gamma / H).reshape(H, 1))  # mean(g * xhat) = mean(dy * xhat * gamma)
        dx = (g - g_mean - xhat * g_xhat_mean) * rstd
        return tuple(a.as_nd_ndarray() for a in (dx.reshape(x.shape), _column_sum(dy_xhat), _column_sum(dy)))


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis of `x` (recorded by autograd) with the backward above."""
    # MXNet 1.9.1's Function drops the gradient of an input whose grad_req is 'add' (its backward
    # entry handles 'write' only): a parameter with 'add' (micro-batches) gets it through `* 1`,
    # whose own backward adds (a `copy()`'s overwrites).
    return _LayerNorm(eps)(x, gamma * 1, beta * 1)


def normalize(ln: nn.LayerNorm, X: np.ndarray, fast_backward: bool) -> np.ndarray:
    """`ln(X)`; with `fast_backward`, while autograd records outside a hybridized graph, the same
    LayerNorm with the faster backward (`layer_norm`)."""
    if in_use(fast_backward) and not isinstance(X, mx.sym.Symbol):
        return layer_norm(X, ln.gamma.data(X.ctx), ln.beta.data(X.ctx), ln._epsilon)
    return ln(X)


class _AddBroadcastRows(autograd.Function):
    """x (B, T, H) + p (1, T, H): the sum over B of the gradient as one matrix-vector product."""

    def forward(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        return x + p

    def backward(self, dy):
        dy = dy.as_np_ndarray()
        return dy.as_nd_ndarray(), _column_sum(dy.reshape(dy.shape[0], -1)).reshape(1, *dy.shape[1:]).as_nd_ndarray()


def add_to_every_row(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """`x + p` for x (B, T, H) and p (1, T, H), recorded by autograd, with the faster backward."""
    return _AddBroadcastRows()(x, p)
