"""What a job needs from the framework besides the model: devices, seeds, the book's loss and optimizer."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn

from nlibert.core.distributed import JOIN_TIMEOUT_S, LaunchProcess, World, rank_processes
from nlibert.core.names import decays


def parse_devices(spec: str | None) -> list[torch.device]:
    """'cpu', 'cuda' (every GPU), or a comma list like 'cuda:0,cuda:1'; None means every GPU, else the CPU."""
    from .train import try_all_gpus
    if spec is None:
        return try_all_gpus()
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    try:  # 'gpu' as MXNet spells it
        devices = [torch.device(part.strip().replace("gpu", "cuda")) for part in spec.split(",")]
    except RuntimeError as e:
        raise ValueError(f"--device {spec}: not a device ({e}); use cpu, cuda or a list like cuda:0,cuda:1") from None
    for d in devices:
        if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"--device {spec}: {d} is not available")
    return devices


def init_distributed(timeout: float = JOIN_TIMEOUT_S) -> World:
    """Join the job torchrun (or `launch_processes`) described in the environment (`RANK`,
    `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`/`MASTER_PORT`): a `torch.distributed` process group,
    gloo for CPU tensors and NCCL for CUDA ones, whose collectives give up after `timeout` seconds.
    Without `WORLD_SIZE` > 1, a job of one process (nothing initialised)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import datetime
    import torch.distributed as dist
    if not dist.is_initialized():
        engines = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(engines, timeout=datetime.timedelta(seconds=timeout))

    def all_sum(values: np.ndarray) -> np.ndarray:
        total = torch.as_tensor(np.asarray(values, dtype=np.float64))
        dist.all_reduce(total)  # a CPU tensor: gloo, whatever the training devices are
        return total.numpy()

    def close() -> None:
        dist.barrier()
        dist.destroy_process_group()

    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 all_sum=all_sum, barrier=dist.barrier, close=close)


def launch_processes(nproc: int, port: int) -> list[LaunchProcess]:
    """The processes of an `nproc`-process job on this machine, as torchrun starts them: one worker
    per rank, with the environment `init_distributed` reads, meeting at 127.0.0.1:`port`."""
    return rank_processes(nproc, port, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loss() -> nn.Module:
    """The book's loss: per-example cross-entropy, summed before backward by `train_batch_ch13`."""
    return nn.CrossEntropyLoss(reduction="none")


def make_trainer(net: nn.Module, lr: float, fused: bool = False, optimizer: str = "adam",
                 weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The book's Adam, or with `optimizer='adamw'` AdamW's decoupled `weight_decay` on the
    parameters `core.names.decays` names (not biases, not LayerNorm weights). `fused=True` (the fast
    path) updates each parameter in one kernel instead of a handful of elementwise passes over it:
    the same update, up to rounding."""
    fused = True if fused else None
    if optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=lr, fused=fused)
    if optimizer != "adamw":
        raise ValueError(f"unknown optimizer {optimizer!r}: use adam or adamw")
    named = list(net.named_parameters())  # the torch names are the canonical ones
    groups = [{"params": [p for name, p in named if decays(name)], "weight_decay": weight_decay},
              {"params": [p for name, p in named if not decays(name)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def framework_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "threads": str(torch.get_num_threads()),
            "cuda": str(torch.version.cuda), "cpu_count": str(os.cpu_count())}


def initialize_classifier_head(net: nn.Module, devices: list[torch.device]) -> None:
    """The new `output` layer keeps torch's default init (as the book); put the whole net on devices[0]."""
    net.to(devices[0])


def bert_outputs(bert: nn.Module, token_ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray,
                 pred_positions: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(encoded_X, mlm_Y_hat, nsp_Y_hat)` of a `BERTModel` in evaluation mode, as numpy arrays."""
    bert.eval()
    with torch.no_grad():
        outputs = bert(*(torch.as_tensor(a, device=device) for a in (token_ids, segments, valid_lens, pred_positions)))
    return tuple(o.float().cpu().numpy() for o in outputs)


def classifier_logits(net: nn.Module, token_ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray,
                      device: torch.device) -> np.ndarray:
    """A `BERTClassifier`'s logits in evaluation mode, as a numpy array."""
    net.eval()
    with torch.no_grad():
        logits = net(tuple(torch.as_tensor(a, device=device) for a in (token_ids, segments, valid_lens)))
    return logits.float().cpu().numpy()
