"""Reduced-precision syncs (``localsgd.sync_precision``): DiLoCo's pseudo-gradients sent as bfloat16 or int8.

torchft 0.2.0's ``should_quantize`` needs triton and CUDA and on CPU silently sends float32. This wraps the
Manager's allreduce instead, outside the byte count and the silence guard, so that both, and torchft's own
error handling, see the small tensors that actually travel; on any device.

- bfloat16: each group sends its values rounded to bfloat16, the sum is taken in bfloat16 (gloo and NCCL
  sum in the tensor's type) and divided by the participants in float32 on arrival.
- int8: the values are cut into blocks of :data:`BLOCK`; one small float32 allreduce (MAX) first agrees on
  each block's largest magnitude across groups, then every group sends ``round(x / scale * L)`` as int8
  and the int8 sum arrives exactly, because ``L = 127 // participants`` leaves room for every group's
  share. The mean is ``sum * scale / (L * participants)`` in float32: each value within
  ``scale / (2 L)`` of its group's own, and the sum identical in every group, so the groups' weights stay
  identical. The scale exchange is synchronous: one round trip of 1/64 of the bytes before the transfer.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
import torch.nn.functional as F
from torch.distributed import ReduceOp

BLOCK = 256  # values per int8 scale: the scales add 4 / BLOCK bytes per value (1.6 %), at least 4 per tensor
WIRE_DTYPES = {"bfloat16": torch.bfloat16, "int8": torch.int8}


def int8_levels(participants: int) -> int:
    """Levels per side each group may use, so that the int8 sum of every group's values cannot overflow."""
    return 127 // max(participants, 1)


def block_scales(values: torch.Tensor) -> torch.Tensor:
    """Each block's largest magnitude (float32), one per :data:`BLOCK` values of ``values`` flattened."""
    return _blocks(values).abs().amax(dim=1).float()


def encode_int8(values: torch.Tensor, scales: torch.Tensor, levels: int) -> torch.Tensor:
    """``values`` flattened, as int8 in ``[-levels, levels]`` relative to their block's scale (no padding sent)."""
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(_blocks(values).float() / safe[:, None] * levels)
    return q.clamp_(-levels, levels).to(torch.int8).view(-1)[:values.numel()]


def decode_int8(summed: torch.Tensor, scales: torch.Tensor, levels: int, participants: int,
                like: torch.Tensor) -> torch.Tensor:
    """The mean of ``participants`` groups' int8 values ``summed`` blockwise, shaped and typed ``like``."""
    mean = _blocks(summed).float() * (scales / (levels * max(participants, 1)))[:, None]
    return mean.view(-1)[:like.numel()].view(like.shape).to(like.dtype)


def _blocks(values: torch.Tensor) -> torch.Tensor:
    flat = values.detach().reshape(-1)
    return F.pad(flat, (0, (-flat.numel()) % BLOCK)).view(-1, BLOCK)


def install(manager: Any, precision: str) -> None:
    """Make ``manager.allreduce`` send floating-point averages in ``precision`` (float32: leave it alone).

    Install it last, over the byte count and the silence guard. Only averages of floating-point tensors
    change (what DiLoCo sends); any other reduction passes through untouched.
    """
    if precision == "float32":
        return
    if precision not in WIRE_DTYPES:
        raise ValueError(f"unknown sync precision {precision!r}")
    allreduce = manager.allreduce

    def reduced(tensor: torch.Tensor, should_quantize: bool = False, reduce_op: Any = ReduceOp.AVG) -> Any:
        if reduce_op != ReduceOp.AVG or not torch.is_floating_point(tensor) or manager.errored():
            return allreduce(tensor, should_quantize=should_quantize, reduce_op=reduce_op)
        if precision == "bfloat16":
            wire = tensor.detach().to(torch.bfloat16)
            work = allreduce(wire, reduce_op=ReduceOp.SUM)
            participants = manager.num_participants()  # the quorum is in: allreduce waited for it
            return _DecodedWork(work, lambda: tensor.copy_(wire.to(tensor.dtype).div_(max(participants, 1))),
                                tensor)
        manager.wait_quorum()
        participants = manager.num_participants()
        levels = int8_levels(participants)
        scales = block_scales(tensor)
        allreduce(scales, reduce_op=ReduceOp.MAX).wait()  # errors go to the Manager: the sync will not commit
        wire = encode_int8(tensor, scales, levels)
        work = allreduce(wire, reduce_op=ReduceOp.SUM)
        return _DecodedWork(work, lambda: tensor.copy_(decode_int8(wire, scales, levels, participants, tensor)),
                            tensor)

    manager.allreduce = reduced


class _DecodedWork:
    """The allreduce of the wire tensor; ``wait`` writes the mean back into the caller's tensor.

    Like torchft's managed work, the callbacks chained on ``get_future()`` (DiLoCo's bucketed copy-back) run
    in ``wait``, after the value is in place.
    """

    def __init__(self, inner: Any, decode: Callable[[], Any], value: torch.Tensor) -> None:
        self._inner, self._decode, self._value = inner, decode, value
        self._callbacks: List[Callable[[Any], Any]] = []
        self._waited: Optional[bool] = None

    def wait(self, timeout: Any = None) -> bool:
        if self._waited is None:
            ok = self._inner.wait() if timeout is None else self._inner.wait(timeout)
            self._waited = ok is not False
            if self._waited:
                self._decode()
            for callback in self._callbacks:
                done: torch.futures.Future = torch.futures.Future()
                done.set_result(self._value)
                callback(done)
        return self._waited

    def get_future(self) -> "_DecodedWork":
        return self

    def then(self, callback: Callable[[Any], Any]) -> "_DecodedWork":
        self._callbacks.append(callback)
        return self
