"""SAM's prompt encoder + mask decoder with PerSAM's guidance, batched over prompts and exportable.

One module serves every decoder call PerSense makes. Per prompt b:
- `persam_weight[b] = 1` turns PerSAM's guidance on: the target embedding T is added to the tokens
  before each transformer block (in the original an in-place add that also shifts the positional
  term of the tokens to P + T) and to the final query, and `attn_sim` re-weights the token-to-image
  attention of each block (a second softmax). `0` gives stock SAM.
- `has_mask_input[b] = 1` uses `mask_input[b]` (low-res logits) as SAM's dense prompt.
- a box is two points labelled 2 and 3; label -1 is SAM's padding point.
With `best_only=False` (the literal form the PyTorch oracle runs, as the original) the outputs are
low-res logits [B,4,256,256] and IoU predictions [B,4] for all 4 mask tokens (0 = single-mask output,
1..3 = multimask outputs). With `best_only=True` (the exported `sam_decoder`) SAM's best multimask output
is chosen inside the graph (index 1..3 by predicted IoU, the first maximum on ties, as np.argmax): the
chosen token's hypernetwork row is gathered before the mask projection, so only one mask is projected,
and the outputs are `low_res_masks` [B,256,256] and `iou_predictions` [B].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from persense.export.sam.modeling import Sam
from persense.runtime.manifest import tensor_names
from persense.runtime.models.sam import DECODER_IO


def attention(
    module: nn.Module, q: Tensor, k: Tensor, v: Tensor, attn_sim: Tensor | None = None, guided: Tensor | None = None
) -> Tensor:
    """segment-anything's Attention.forward, plus PerSAM's `softmax(attn + attn_sim)` where `guided`."""
    heads = module.num_heads
    q, k, v = module.q_proj(q), module.k_proj(k), module.v_proj(v)
    b, nq, c = q.shape
    q = q.reshape(b, nq, heads, c // heads).transpose(1, 2)
    k = k.reshape(b, k.shape[1], heads, c // heads).transpose(1, 2)
    v = v.reshape(b, v.shape[1], heads, c // heads).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    if attn_sim is not None:
        attn = torch.where(guided, torch.softmax(attn + attn_sim, dim=-1), attn)
    out = (attn @ v).transpose(1, 2).reshape(b, nq, c)
    return module.out_proj(out)


def select_best(hyper_in: Tensor, iou: Tensor) -> tuple[Tensor, Tensor]:
    """Per prompt, SAM's best multimask output (index 1..3 by IoU, first maximum on ties): its hypernetwork
    row (B,1,C) and its score (B,). Gathering the row before the mask projection is exact."""
    best = 1 + torch.argmax(iou[:, 1:], dim=1)
    rows = best.reshape(-1, 1, 1).expand(-1, 1, hyper_in.shape[-1])
    return torch.gather(hyper_in, 1, rows), torch.gather(iou, 1, best.reshape(-1, 1)).reshape(-1)


class PerSamDecoder(nn.Module):
    """Prompt encoder + PerSAM-guided mask decoder over a batch of prompts for one image embedding."""

    input_names = tensor_names(DECODER_IO[0])
    output_names = tensor_names(DECODER_IO[1])

    def __init__(self, sam: Sam, best_only: bool = False) -> None:
        super().__init__()
        self.best_only = best_only
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().detach(), persistent=False)

    def embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        """Sparse embeddings of (B, N, 2) input-frame points with SAM labels -1/0/1/2/3."""
        pe = self.prompt_encoder
        h, w = pe.input_image_size
        xy = (coords + 0.5) / torch.tensor([w, h], dtype=coords.dtype, device=coords.device)
        emb = pe.pe_layer._pe_encoding(xy)
        labels = labels.unsqueeze(-1)
        emb = emb * (labels != -1) + pe.not_a_point_embed.weight * (labels == -1)
        for i, point_embed in enumerate(pe.point_embeddings):
            emb = emb + point_embed.weight * (labels == i)
        return emb

    def dense_embedding(self, mask_input: Tensor, has_mask_input: Tensor) -> Tensor:
        """SAM's dense prompt per prompt: downscaled mask logits, or the learned no-mask embedding."""
        pe = self.prompt_encoder
        from_mask = pe.mask_downscaling(mask_input)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        use = has_mask_input.reshape(-1, 1, 1, 1)
        return use * from_mask + (1 - use) * no_mask

    def image_tokens(self, image_embeddings: Tensor, mask_input: Tensor, has_mask_input: Tensor) -> Tensor:
        """The image tokens (B,N,C) the transformer starts from: the embedding plus SAM's dense prompt."""
        src = image_embeddings + self.dense_embedding(mask_input, has_mask_input)
        return src.flatten(2).permute(0, 2, 1)

    def transformer(
        self, keys: Tensor, tokens: Tensor, target: Tensor, attn_sim: Tensor, guided: Tensor
    ) -> tuple[Tensor, Tensor]:
        """TwoWayTransformer.forward on image tokens `keys` (B,N,C) with PerSAM's additions, written without
        in-place aliasing."""
        tf = self.mask_decoder.transformer
        key_pe = self.image_pe.flatten(2).permute(0, 2, 1)
        query_pe = tokens + target  # the original's in-place add also shifts the tokens' positional term
        queries = tokens
        for layer in tf.layers:
            queries = queries + target
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            q = queries + query_pe
            k = keys + key_pe
            queries = layer.norm2(
                queries + self.tokens_to_image(layer.cross_attn_token_to_image, q, k, keys, attn_sim, guided)
            )
            queries = layer.norm3(queries + layer.mlp(queries))
            q = queries + query_pe
            update = self.image_to_tokens(layer.cross_attn_image_to_token, k, q, queries)
            keys = self.image_norm(layer.norm4, keys, update)
        q = queries + query_pe + target
        k = keys + key_pe
        queries = tf.norm_final_attn(queries + self.tokens_to_image(tf.final_attn_token_to_image, q, k, keys))
        return queries, keys

    @staticmethod
    def tokens_to_image(
        module: nn.Module, q: Tensor, k: Tensor, v: Tensor, attn_sim: Tensor | None = None, guided: Tensor | None = None
    ) -> Tensor:
        """Token-to-image attention, PerSAM-guided where `guided`."""
        return attention(module, q, k, v, attn_sim, guided)

    @staticmethod
    def image_to_tokens(module: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Image-to-token attention (stock)."""
        return module(q=q, k=k, v=v)

    @staticmethod
    def image_norm(norm: nn.Module, keys: Tensor, update: Tensor) -> Tensor:
        """Residual add and LayerNorm of the image tokens (B,N,C)."""
        return norm(keys + update)

    def forward(
        self,
        image_embeddings: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
        target_embedding: Tensor,
        attn_sim: Tensor,
        persam_weight: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Decode B prompts against one image embedding: (B,4,256,256) logits and (B,4) IoU scores, or with
        `best_only` the best multimask output's (B,256,256) logits and (B,) score."""
        md = self.mask_decoder
        batch = point_coords.shape[0]
        sparse = self.embed_points(point_coords, point_labels)
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        keys = self.image_tokens(image_embeddings, mask_input, has_mask_input)
        weight = persam_weight.reshape(-1, 1, 1)
        target = target_embedding.reshape(1, 1, -1) * weight
        guided = weight.reshape(-1, 1, 1, 1) > 0.5
        sim = attn_sim.reshape(1, 1, 1, -1)
        hs, keys = self.transformer(keys, tokens, target, sim, guided)
        mask_tokens = hs[:, 1 : 1 + md.num_mask_tokens, :]
        hyper_in = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1)
        iou = md.iou_prediction_head(hs[:, 0, :])
        if self.best_only:
            hyper_in, iou = select_best(hyper_in, iou)
            return self.masks(keys, hyper_in, image_embeddings.shape[-1])[:, 0], iou
        return self.masks(keys, hyper_in, image_embeddings.shape[-1]), iou

    def masks(self, keys: Tensor, hyper_in: Tensor, grid: int) -> Tensor:
        """Low-res mask logits: upscale the image tokens (B,N,C) and project with the hypernetwork outputs."""
        b, n, c = keys.shape
        upscaled = self.mask_decoder.output_upscaling(keys.transpose(1, 2).reshape(b, c, grid, grid))
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
