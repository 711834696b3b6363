"""Grounding DINO as one traceable module: the contract's I/O, and the patches that keep H, W and T dynamic.

transformers' GroundingDinoForObjectDetection is exported with torch's TorchScript tracer (the dynamo exporter
specialises the Swin and deformable-attention shapes to the example image). The tracer records shape arithmetic
but bakes Python branches and lists turned into tensors, so while tracing (and only then) `export_patches`
swaps in shape-agnostic equivalents that compute the same values for every size:
- the text self-attention mask and position ids between delimiters, without cummax/isin (no ONNX kernels);
- Swin's padding to the patch size, to even sizes (patch merging) and to the window size, applied always
  (a zero pad is a no-op) instead of behind `if size % n`, and the un-padding slice applied always;
- `torch.as_tensor(spatial_shapes_list)` and `torch.linspace` inside the Grounding DINO module, which would
  freeze the example's feature-map sizes, built from traced sizes instead.
Swin clamps its window where a stage is not larger than it; that branch is baked, so images must keep every
stage larger than the window (`min_image_side`).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from persense.runtime.manifest import tensor_names
from persense.runtime.models.detector import DETECTOR_IO

INPUT_NAMES = tensor_names(DETECTOR_IO[0])
OUTPUT_NAMES = tensor_names(DETECTOR_IO[1])


def exportable_config(config: Any) -> Any:
    """No custom deformable-attention kernels and eager attention (the ops the ONNX exporter knows)."""
    config.disable_custom_kernels = True
    config._attn_implementation = "eager"
    return config


class GroundingDinoDetector(nn.Module):
    """pixel_values [1,3,H,W], input_ids/attention_mask/token_type_ids [1,T] -> logits [1,Q,T], boxes [1,Q,4]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Raw per-token logits of the T real tokens (transformers pads to max_text_len) and cx,cy,w,h boxes."""
        out = self.model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        )
        return out.logits[..., : input_ids.shape[1]], out.pred_boxes


def phrase_masks(input_ids: Tensor, special_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' generate_masks_with_special_tokens_and_transfer_map with comparisons instead of cummax/isin."""
    batch, n = input_ids.shape
    special = (input_ids[..., None] == special_tokens).any(-1)  # [B,N]
    idx = torch.arange(n, device=input_ids.device)
    before = idx[None, :] <= idx[:, None]  # [i, j]: j <= i
    prev_incl = torch.where(before[None] & special[:, None, :], idx[None, None, :], -1).amax(-1)
    prev = torch.cat([prev_incl.new_full((batch, 1), -1), prev_incl[:, :-1]], 1)
    nxt = torch.where(before.T[None] & special[:, None, :], idx[None, None, :], n).amin(-1)
    valid = (nxt != 0) & (nxt != n - 1) & (nxt != n)
    mask = ((nxt[:, :, None] == nxt[:, None, :]) & valid[:, None, :]) | (idx[:, None] == idx[None, :])[None]
    position_ids = torch.where(valid, idx[None] - prev - 1, 0).clamp(min=0)
    return mask, position_ids


def _as_size(value: Any) -> Tensor:
    """A traced size (0-d tensor while tracing, int otherwise) as a 0-d int64 tensor."""
    return value.to(torch.long) if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.long)


def _shapes_tensor(data: Any, dtype: torch.dtype | None = None, device: Any = None) -> Tensor:
    """torch.as_tensor for the list of (height, width) pairs, keeping traced sizes traced."""
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple)):
        return torch.stack([torch.stack([_as_size(h), _as_size(w)]) for h, w in data]).to(dtype=dtype, device=device)
    return torch.as_tensor(data, dtype=dtype, device=device)


def _linspace(start: Any, end: Any, steps: Any, dtype: torch.dtype | None = None, device: Any = None) -> Tensor:
    """torch.linspace from arange (exact where the step is 1, as in every Grounding DINO call)."""
    ramp = torch.arange(steps, dtype=dtype, device=device)
    return start + ramp * ((end - start) / (steps - 1))


class _TorchInGroundingDino(types.ModuleType):
    """The `torch` module as seen by transformers' Grounding DINO file while tracing: two functions replaced."""

    as_tensor = staticmethod(_shapes_tensor)
    linspace = staticmethod(_linspace)

    def __getattr__(self, name: str) -> Any:
        """Everything else is torch's."""
        return getattr(torch, name)


def _patch_embed_pad(self: nn.Module, pixel_values: Tensor, height: Any, width: Any) -> Tensor:
    """SwinPatchEmbeddings.maybe_pad without the branch: pad right/bottom up to the patch size."""
    ph, pw = self.patch_size
    return nn.functional.pad(pixel_values, (0, (pw - width % pw) % pw, 0, (ph - height % ph) % ph))


def _merge_pad(self: nn.Module, input_feature: Tensor, height: Any, width: Any) -> Tensor:
    """SwinPatchMerging.maybe_pad without the branch: pad to even sizes."""
    return nn.functional.pad(input_feature, (0, 0, 0, width % 2, 0, height % 2))


def _swin_layer_forward(
    self: nn.Module,
    hidden_states: Tensor,
    input_dimensions: tuple[Any, Any],
    always_partition: bool = False,
    **kwargs: Any,
) -> tuple[Tensor, Any]:
    """SwinLayer.forward with the un-padding slice applied unconditionally (a no-op without padding)."""
    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)
    height, width = input_dimensions
    batch_size, _, channels = hidden_states.size()
    shortcut = hidden_states
    hidden_states = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
    hidden_states, _ = self.maybe_pad(hidden_states, height, width)
    _, height_pad, width_pad, _ = hidden_states.shape
    windows = window_partition(self.cyclic_shift(hidden_states), self.window_size)
    windows = windows.view(-1, self.window_size * self.window_size, channels)
    attn_mask = self.get_attn_mask(height_pad, width_pad, dtype=hidden_states.dtype, device=windows.device)
    attention_output, attn_weights = self.attention(windows, attn_mask, **kwargs)
    attention_windows = self.dropout(attention_output).view(-1, self.window_size, self.window_size, channels)
    attention_windows = self.cyclic_shift(
        window_reverse(attention_windows, self.window_size, height_pad, width_pad), reverse=True
    )
    attention_windows = attention_windows[:, :height, :width, :].contiguous().view(batch_size, height * width, channels)
    hidden_states = shortcut + self.drop_path(attention_windows)
    hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states))) + hidden_states
    return hidden_states, attn_weights


def window_partition(features: Tensor, window: int) -> Tensor:
    """transformers' Swin window_partition (imported lazily so this module imports without transformers)."""
    from transformers.models.swin.modeling_swin import window_partition as partition

    return partition(features, window)


def window_reverse(windows: Tensor, window: int, height: Any, width: Any) -> Tensor:
    """transformers' Swin window_reverse."""
    from transformers.models.swin.modeling_swin import window_reverse as reverse

    return reverse(windows, window, height, width)


@contextlib.contextmanager
def export_patches() -> Iterator[None]:
    """Swap in the shape-agnostic equivalents (module docstring) for the duration of a trace."""
    from transformers.models.grounding_dino import modeling_grounding_dino as gd
    from transformers.models.swin import modeling_swin as swin

    replacements = [
        (gd, "generate_masks_with_special_tokens_and_transfer_map", phrase_masks),
        (gd, "torch", _TorchInGroundingDino("torch")),
        (swin.SwinPatchEmbeddings, "maybe_pad", _patch_embed_pad),
        (swin.SwinPatchMerging, "maybe_pad", _merge_pad),
        (swin.SwinLayer, "forward", _swin_layer_forward),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    try:
        for owner, name, value in replacements:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)
