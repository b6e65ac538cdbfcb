"""What a caller asks one forward pass to hand back beside its outputs.

The example level scores samples by the last block's head-averaged [CLS] -> patch attention;
USKD's weak classifier reads the [CLS] output of a middle block. The model keeps neither: the
caller passes a :class:`TapRequest` (``model(images, taps=request)``) and the forward returns
``(outputs, Tapped)``; without one it returns its outputs alone, as timm's. Both block loops (the
routed blocks, DCAL's paired streams) record through one :class:`TapRecorder`, made per call.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class TapRequest(NamedTuple):
    """What to hand back from one forward pass."""

    cls_attention: bool = False
    """The last block's head-averaged [CLS] -> patch attention (B, patches)."""
    cls_at: int | None = None
    """The [CLS] output (B, D) of this block."""

    def merged(self, other: TapRequest) -> TapRequest:
        """Both requests at once (two methods never tap different blocks: the composition table refuses it)."""
        if None not in (self.cls_at, other.cls_at) and self.cls_at != other.cls_at:
            raise ValueError(f"two [CLS] taps asked for, at blocks {self.cls_at} and {other.cls_at}")
        return TapRequest(self.cls_attention or other.cls_attention,
                          self.cls_at if self.cls_at is not None else other.cls_at)


class Tapped(NamedTuple):
    """What a forward pass handed back (None where it was not asked for, or where there is none:
    the semantic stage's last block has no [CLS] row to rank)."""

    cls_attention: torch.Tensor | None = None
    cls_output: torch.Tensor | None = None


class TapRecorder:
    """Records what ``request`` asks for while ``depth`` blocks run; :meth:`result` hands it back."""

    def __init__(self, request: TapRequest | None, depth: int):
        request = request or TapRequest()
        self.attention_block = depth - 1 if request.cls_attention else None
        self.cls_block = request.cls_at
        self.cls_attention: torch.Tensor | None = None
        self.cls_output: torch.Tensor | None = None

    def wants_cls_attention(self, index: int) -> bool:
        """Whether block ``index`` must compute its [CLS] attention row for the request."""
        return index == self.attention_block

    def record(self, index: int, x: torch.Tensor, cls_attention: torch.Tensor | None = None) -> None:
        """After block ``index``: its output tokens ``x`` and, where :meth:`wants_cls_attention`, its
        [CLS] -> patch attention row (None where the block has none)."""
        if index == self.attention_block:
            self.cls_attention = cls_attention
        if index == self.cls_block:
            self.cls_output = x[:, 0]

    def result(self) -> Tapped:
        return Tapped(self.cls_attention, self.cls_output)


def answer(outputs: object, recorder: TapRecorder | None) -> object:
    """A forward's return: its outputs alone without a request, else ``(outputs, Tapped)``."""
    return outputs if recorder is None else (outputs, recorder.result())


NOTHING_TAPPED = Tapped()
"""What a forward pass asked for nothing hands back."""
