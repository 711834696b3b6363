"""SAM's image encoder for GPUs: every attention is one fused attention with the relative positions as a bias.

segment-anything adds the decomposed relative-position term to explicit attention logits (4096 x 4096 per
head in a global block) before a separate softmax; the CPU export (`cpu_encoder`) further splits global
attention into blocks of query rows. On a GPU that graph is bound by memory traffic, not by its GEMMs.
Here both global and windowed attention compute the term once as an additive bias, as segment-anything-fast
does (`rel_h[..., :, None] + rel_w[..., None, :]` -> [B, heads, Nq, Nk]), and hand query, key, value and
bias to one attention call, so the logits, softmax and product can run in one fused kernel. Softmax is
taken over the biased logits exactly as before, so the result is the original's up to rounding.

Forms of that call in the exported graph (`ATTENTION_FORMS`; all four run on ONNX Runtime CPU here):
- `attention` (default): `F.scaled_dot_product_attention` exported at opset 23, which torch 2.13's
  dynamo exporter writes as the standard ONNX `Attention` op with a float `attn_mask`; ONNX Runtime
  implements it on CPU and CUDA and can dispatch it to fused kernels. Standard op, FP16-convertible as is.
- `mha`: ONNX Runtime's contrib `com.microsoft.MultiHeadAttention` with `attention_bias`, whose CUDA
  kernels (cutlass memory-efficient attention) take a bias; ONNX Runtime only: TensorRT cannot parse it.
- `decomposed`: the same module exported at opset 18, where SDPA lowers to MatMul/Add/Softmax/MatMul:
  no row blocks, all standard ops (the pattern TensorRT's own attention fusion matches).
- `folded`: the bias folded into the product (`folded_attention`): q' = [q*scale, q.Rh, q.Rw] and
  k' = [k, onehot(key row), onehot(key column)], then ONNX `Attention` (opset 23) without a mask at scale 1.
  The [heads, S, S] bias (0.8 GB per global block of vit_b in FP32) is never written and mask-free fused
  (flash) kernels become eligible, at a QK width of head_dim + h + w (vit_b global: 64 + 128).
All forms are exact up to rounding; which is fastest on a GPU is for measurement to decide.
"""

from __future__ import annotations

import copy
from pathlib import Path

import onnxscript
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema
from torch import Tensor, nn

from persense.export.artefacts import describe
from persense.export.onnx_io import export_onnx
from persense.export.sam.cpu_encoder import key_positions
from persense.export.sam.graphs import encoder_example_inputs
from persense.export.sam.modeling import modeling
from persense.runtime.errors import PersenseError
from persense.runtime.manifest import Artefact, tensor_names
from persense.runtime.models.sam import ENCODER_IO

ATTENTION_FORMS = ("attention", "mha", "decomposed", "folded")
DEFAULT_FORM = "attention"
OPSETS = {"attention": 23, "mha": 18, "decomposed": 18, "folded": 23}
# manifest `extra["backends"]`: the runtime picks sam_encoder_gpu on ort-cuda only (TensorRT keeps sam_encoder)
BACKENDS = ["ort-cuda"]


def _heads(t: Tensor, num_heads: int) -> Tensor:
    """[B,S,heads*C] -> [B,heads,S,C]."""
    return t.reshape(t.shape[0], t.shape[1], num_heads, -1).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """[B,heads,S,C] -> [B,S,heads*C]."""
    return t.transpose(1, 2).flatten(2)


def split_heads_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, num_heads: int, scale: float) -> Tensor:
    """Attention of [B,S,D] query/key/value with an additive bias [B,heads,S,S]; returns [B,S,D]."""
    out = F.scaled_dot_product_attention(
        _heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads), attn_mask=bias, scale=scale
    )
    return _merge_heads(out)


def folded_attention(
    q: Tensor, k: Tensor, v: Tensor, term_h: Tensor, term_w: Tensor, num_heads: int, scale: float
) -> Tensor:
    """Attention with the relative-position bias folded into the product, so no [S,S] bias is ever written.

    q' = [q * scale, term_h, term_w] and k' = [k, onehot(key row), onehot(key column)] give
    q'.k' = scale q.k + term_h[key row] + term_w[key column], the biased logits; softmax(q'k'^T) v at scale 1.
    q/k/v [B,S,D], term_h [B,heads,h,w,h], term_w [B,heads,h,w,w]; returns [B,S,D].
    """
    b, s, _ = q.shape
    rows, cols = term_w.shape[2], term_w.shape[3]
    positions = key_positions(rows, cols, q.dtype).expand(b, num_heads, s, rows + cols)
    query = torch.cat(
        [_heads(q, num_heads) * scale, term_h.reshape(b, num_heads, s, rows), term_w.reshape(b, num_heads, s, cols)],
        dim=-1,
    )
    key = torch.cat([_heads(k, num_heads), positions], dim=-1)
    return _merge_heads(F.scaled_dot_product_attention(query, key, _heads(v, num_heads), scale=1.0))


@torch.library.custom_op("persense::multi_head_attention", mutates_args=())
def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, num_heads: int, scale: float) -> Tensor:
    """split_heads_attention as one opaque op, so that the exporter can write it as ORT's MultiHeadAttention."""
    return split_heads_attention(q, k, v, bias, num_heads, scale)


@multi_head_attention.register_fake
def _multi_head_attention_shape(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, num_heads: int, scale: float) -> Tensor:
    """Output shape and dtype for tracing: those of the query."""
    return torch.empty_like(q)


_OPTIONAL = OpSchema.FormalParameterOption.Optional
# The part of ONNX Runtime's contrib schema this export uses (onnx itself has no schema for the domain).
_MHA_SCHEMA = OpSchema(
    "MultiHeadAttention",
    "com.microsoft",
    1,
    doc="onnxruntime contrib MultiHeadAttention (inputs used here)",
    inputs=[
        OpSchema.FormalParameter("query", "T"),
        OpSchema.FormalParameter("key", "T"),
        OpSchema.FormalParameter("value", "T"),
        OpSchema.FormalParameter("bias", "T", param_option=_OPTIONAL),
        OpSchema.FormalParameter("key_padding_mask", "M", param_option=_OPTIONAL),
        OpSchema.FormalParameter("attention_bias", "T", param_option=_OPTIONAL),
    ],
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
    attributes=[
        OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "number of heads"),
        OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "scale of the QK product"),
    ],
)
_MHA_OP = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", _MHA_SCHEMA)


def _multi_head_attention_onnx(q, k, v, bias, num_heads: int, scale: float):  # noqa: ANN001, ANN202 (onnxscript values)
    """ONNX translation of persense::multi_head_attention: one com.microsoft.MultiHeadAttention node."""
    return _MHA_OP(q, k, v, None, None, bias, num_heads=num_heads, scale=scale)


class FusedAttention(nn.Module):
    """segment-anything's image-encoder Attention as one attention call with the relative positions as a bias."""

    def __init__(self, attention: nn.Module, form: str = DEFAULT_FORM) -> None:
        super().__init__()
        self.inner = attention
        self.form = form

    def forward(self, x: Tensor) -> Tensor:
        """Same output as Attention.forward with use_rel_pos (global [1,64,64,C] or windows [W,14,14,C])."""
        inner = self.inner
        b, h, w, _ = x.shape
        heads = inner.num_heads
        q, k, v = inner.qkv(x).reshape(b, h * w, 3, -1).unbind(2)
        grid_q = q.reshape(b, h, w, heads, -1).permute(0, 3, 1, 2, 4)
        rel_h = modeling.image_encoder.get_rel_pos(h, h, inner.rel_pos_h)
        rel_w = modeling.image_encoder.get_rel_pos(w, w, inner.rel_pos_w)
        term_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h)
        term_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w)
        if self.form == "folded":
            out = folded_attention(q, k, v, term_h, term_w, heads, inner.scale)
        else:
            bias = (term_h[..., :, None] + term_w[..., None, :]).reshape(b, heads, h * w, h * w)
            attend = multi_head_attention if self.form == "mha" else split_heads_attention
            out = attend(q, k, v, bias, heads, inner.scale)
        return inner.proj(out.reshape(b, h, w, -1))


def gpu_encoder(encoder: nn.Module, form: str = DEFAULT_FORM) -> nn.Module:
    """A copy of the image encoder whose attentions (global and windowed) are FusedAttention of `form`."""
    if form not in ATTENTION_FORMS:
        raise PersenseError(f"unknown attention form {form!r}; choose one of {', '.join(ATTENTION_FORMS)}")
    fused = copy.deepcopy(encoder)
    for block in fused.blocks:
        if not block.attn.use_rel_pos:
            raise PersenseError("FusedAttention needs SAM's relative-position attention (use_rel_pos=True)")
        block.attn = FusedAttention(block.attn, form)
    return fused.eval()


def export_options(form: str) -> dict:
    """torch.onnx.export options of a form: its opset and, for `mha`, the MultiHeadAttention translation."""
    options: dict = {"opset_version": OPSETS[form]}
    if form == "mha":
        options["custom_translation_table"] = {
            torch.ops.persense.multi_head_attention.default: _multi_head_attention_onnx
        }
    return options


def export_gpu_encoder(sam: nn.Module, path: Path, model_type: str, source: str, form: str = DEFAULT_FORM) -> Artefact:
    """`sam_encoder_gpu`: sam_encoder's I/O (`image` -> `image_embeddings`) with FusedAttention of `form`."""
    with torch.no_grad():
        seconds = export_onnx(
            gpu_encoder(sam.image_encoder, form),
            encoder_example_inputs(),
            path,
            tensor_names(ENCODER_IO[0]),
            tensor_names(ENCODER_IO[1]),
            options=export_options(form),
        )
    return describe(
        path,
        "sam_encoder",
        "fp32",
        model_type,
        source,
        {"export_seconds": round(seconds, 2), "attention": form, "backends": BACKENDS},
    )
