"""The PerSAM decoder: stock SAM when unguided, the original's in-place PerSAM transformer when guided,
and the exported ONNX graph equal to both for any prompt batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from persense.export.sam.graphs import decoder_example_inputs
from persense.export.sam.persam_decoder import PerSamDecoder
from persense.runtime.backends.ort_engine import OrtEngine
from persense.runtime.metrics import mask_iou
from persense.runtime.models.sam import Guidance, Prompts, SamEngines

MASK_LOGIT_ATOL = 1e-4  # fp32 ONNX Runtime vs torch, on logits of magnitude ~1
PROMPTS = 16  # prompts of the batched cases: a batch, with half of them on each side of a threshold where needed


def _original_attention(module, q, k, v, attn_sim=None):
    """per_segment_anything Attention.forward (softmax, then softmax(attn + attn_sim))."""
    q, k, v = module.q_proj(q), module.k_proj(k), module.v_proj(v)
    q, k, v = (module._separate_heads(t, module.num_heads) for t in (q, k, v))
    attn = torch.softmax(q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1]), dim=-1)
    if attn_sim is not None:
        attn = torch.softmax(attn + attn_sim, dim=-1)
    return module.out_proj(module._recombine_heads(attn @ v))


def _original_block(layer, queries, keys, query_pe, key_pe, attn_sim):
    """per_segment_anything TwoWayAttentionBlock.forward."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = layer.norm2(queries + _original_attention(layer.cross_attn_token_to_image, q, k, keys, attn_sim))
    queries = layer.norm3(queries + layer.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = layer.norm4(keys + layer.cross_attn_image_to_token(q=k, k=q, v=queries))
    return queries, keys


def original_persam_decoder(sam, embedding, point, attn_sim, target_embedding):
    """The original PerSAM decode of one point, with its in-place `queries += target_embedding`."""
    md, tf = sam.mask_decoder, sam.mask_decoder.transformer
    sparse, dense = sam.prompt_encoder(points=(point, torch.ones(1, 1)), boxes=None, masks=None)
    tokens = torch.cat([torch.cat([md.iou_token.weight, md.mask_tokens.weight]).unsqueeze(0), sparse], dim=1)
    src = embedding + dense
    b, c, h, w = src.shape
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = sam.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)
    point_embedding = tokens
    queries = point_embedding
    for layer in tf.layers:
        queries += target_embedding  # in place: on the first layer this also changes point_embedding
        queries, keys = _original_block(layer, queries, keys, point_embedding, key_pe, attn_sim)
    q = queries + point_embedding
    q += target_embedding
    queries = tf.norm_final_attn(queries + tf.final_attn_token_to_image(q=q, k=keys + key_pe, v=keys))
    upscaled = md.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
    hyper = torch.stack([mlp(queries[:, 1 + i]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1)
    masks = (hyper @ upscaled.flatten(2)).view(b, -1, upscaled.shape[2], upscaled.shape[3])
    return masks, md.iou_prediction_head(queries[:, 0])


@pytest.fixture(scope="module")
def decoder(tiny_sam):
    return PerSamDecoder(tiny_sam).eval()


def _inputs(batch, points, guided, with_mask, seed=0):
    args = list(decoder_example_inputs(batch, points))
    g = torch.Generator().manual_seed(seed)
    args[0] = torch.randn(1, 256, 64, 64, generator=g)
    args[2] = torch.ones(batch, points)
    if points > 1:
        args[2][:, -1] = -1
    args[4] = torch.full((batch,), 1.0 if with_mask else 0.0)
    args[7] = torch.full((batch,), 1.0 if guided else 0.0)
    return args


@torch.no_grad()
def test_unguided_decoder_is_stock_sam_for_points_boxes_and_masks(tiny_sam, decoder):
    embedding = torch.randn(1, 256, 64, 64)
    point = torch.tensor([[[300.0, 410.0]]])
    box = torch.tensor([[100.0, 120.0, 500.0, 600.0]])
    mask = torch.randn(1, 1, 256, 256)
    pe = tiny_sam.prompt_encoder.get_dense_pe()
    for use_box, use_mask in [(False, False), (True, False), (False, True), (True, True)]:
        sparse, dense = tiny_sam.prompt_encoder(
            points=(point, torch.ones(1, 1)), boxes=box if use_box else None, masks=mask if use_mask else None
        )
        expected, expected_iou = tiny_sam.mask_decoder.predict_masks(embedding, pe, sparse, dense)
        if use_box:
            coords, labels = torch.cat([point, box.reshape(1, 2, 2)], 1), torch.tensor([[1.0, 2.0, 3.0]])
        else:
            coords, labels = torch.cat([point, torch.zeros(1, 1, 2)], 1), torch.tensor([[1.0, -1.0]])
        got, got_iou = decoder(
            embedding,
            coords,
            labels,
            mask,
            torch.tensor([float(use_mask)]),
            torch.randn(1, 256),
            torch.rand(1, 4096),
            torch.zeros(1),
        )
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_iou, expected_iou, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_guided_decoder_equals_the_original_in_place_persam_transformer(tiny_sam, decoder):
    embedding = torch.randn(1, 256, 64, 64)
    point = torch.tensor([[[512.0, 300.0]]])
    target = torch.randn(1, 1, 256)
    attn_sim = torch.rand(1, 1, 1, 4096)
    expected, expected_iou = original_persam_decoder(tiny_sam, embedding, point, attn_sim, target)
    coords = torch.cat([point, torch.zeros(1, 1, 2)], 1)
    got, got_iou = decoder(
        embedding,
        coords,
        torch.tensor([[1.0, -1.0]]),
        torch.zeros(1, 1, 256, 256),
        torch.zeros(1),
        target.reshape(1, 256),
        attn_sim.reshape(1, 4096),
        torch.ones(1),
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_iou, expected_iou, atol=1e-5, rtol=1e-5)
    unguided, _ = decoder(
        embedding,
        coords,
        torch.tensor([[1.0, -1.0]]),
        torch.zeros(1, 1, 256, 256),
        torch.zeros(1),
        target.reshape(1, 256),
        attn_sim.reshape(1, 4096),
        torch.zeros(1),
    )
    assert (unguided - got).abs().max() > 1e-3  # guidance really changes the output


@pytest.mark.parametrize(
    "batch,points,guided,with_mask", [(1, 2, True, False), (6, 3, False, True), (3, 2, True, True)]
)
def test_reassociated_decoder_equals_the_literal_one(tiny_sam, decoder, batch, points, guided, with_mask):
    from persense.export.sam.reassociated_decoder import ReassociatedDecoder

    args = _inputs(batch, points, guided, with_mask, seed=batch)
    with torch.no_grad():
        expected, expected_iou = decoder(*args)
        got, got_iou = ReassociatedDecoder(tiny_sam).eval()(*args)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_iou, expected_iou, atol=1e-5, rtol=1e-4)


def host_best(low_res: np.ndarray, iou: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SAM's best multimask output chosen on the host from all four: (index 1..3, logits [B,256,256], score [B])."""
    best = 1 + np.argmax(iou[:, 1:], axis=1)
    rows = np.arange(len(best))
    return best, low_res[rows, best], iou[rows, best]


def _feeds(args) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in zip(PerSamDecoder.input_names, args)}


@pytest.fixture(scope="module")
def onnx_decoder(tiny_engines):
    return OrtEngine(tiny_engines / "sam_decoder.onnx", threads=2)


@pytest.fixture(scope="module")
def all_outputs_decoder(tiny_sam, tmp_path_factory):
    """The same re-associated decoder exported with all four outputs (the graph before in-graph selection)."""
    from persense.export.sam.graphs import export_decoder_graph
    from persense.export.sam.reassociated_decoder import ReassociatedDecoder

    path = tmp_path_factory.mktemp("all_outputs") / "sam_decoder_all.onnx"
    with torch.no_grad():
        export_decoder_graph(ReassociatedDecoder(tiny_sam).eval(), path)
    return OrtEngine(path, threads=2)


def test_exported_decoder_returns_only_the_chosen_mask(onnx_decoder):
    assert [(o.name, o.shape) for o in onnx_decoder.outputs] == [
        ("low_res_masks", ("B", 256, 256)),
        ("iou_predictions", ("B",)),
    ]


@pytest.mark.parametrize(
    "batch,points,guided,with_mask",
    [
        (1, 2, False, False),
        (1, 2, True, False),
        (16, 2, True, False),
        (16, 3, False, True),
        (7, 1, False, False),
        (5, 3, True, True),
    ],
)
def test_onnx_decoder_matches_torch(decoder, onnx_decoder, batch, points, guided, with_mask):
    args = _inputs(batch, points, guided, with_mask)
    with torch.no_grad():
        expected, expected_iou = decoder(*args)
    _, expected_best, expected_score = host_best(expected.numpy(), expected_iou.numpy())
    out = onnx_decoder.run(_feeds(args))
    np.testing.assert_allclose(out["low_res_masks"], expected_best, atol=MASK_LOGIT_ATOL)
    np.testing.assert_allclose(out["iou_predictions"], expected_score, atol=1e-5)
    ious = [
        mask_iou(a > 0, b > 0)
        for a, b in zip(out["low_res_masks"].reshape(batch, -1), expected_best.reshape(batch, -1))
    ]
    assert min(ious) >= 0.99


@pytest.mark.parametrize(
    "batch,points,guided,with_mask",
    [(1, 2, False, False), (1, 2, True, False), (16, 2, True, False), (16, 2, False, False), (16, 3, False, True)],
)
def test_in_graph_selection_equals_all_outputs_graph_and_host_selection(
    onnx_decoder, all_outputs_decoder, batch, points, guided, with_mask
):
    feeds = _feeds(_inputs(batch, points, guided, with_mask, seed=batch + 10))
    everything = all_outputs_decoder.run(feeds)
    assert everything["low_res_masks"].shape == (batch, 4, 256, 256)
    best, logits, scores = host_best(everything["low_res_masks"], everything["iou_predictions"])
    chosen = onnx_decoder.run(feeds)
    # the same index: the chosen score is that index's score, and no other candidate's logits are as close
    np.testing.assert_array_equal(chosen["iou_predictions"], scores)
    np.testing.assert_allclose(chosen["low_res_masks"], logits, atol=1e-4)
    distance = np.abs(everything["low_res_masks"][:, 1:] - chosen["low_res_masks"][:, None]).max(axis=(2, 3))
    np.testing.assert_array_equal(1 + np.argmin(distance, axis=1), best)


@torch.no_grad()
def test_in_graph_selection_breaks_ties_as_numpy_argmax(tiny_sam, tmp_path):
    """Tokens 2 and 3 always predict IoU 0 (a tie), token 1 a prompt-dependent IoU centred on 0: the graph picks
    1 where that is positive and 2 (the first maximum of the tie) elsewhere, as np.argmax does."""
    import copy

    from persense.export.sam.graphs import export_decoder_graph
    from persense.export.sam.reassociated_decoder import ReassociatedDecoder

    tied = copy.deepcopy(tiny_sam)
    head = tied.mask_decoder.iou_prediction_head.layers[-1]
    head.weight[2:].zero_()
    head.bias[1:].zero_()
    args = _inputs(PROMPTS, 2, False, False, seed=3)
    middle = PerSamDecoder(tied).eval()(*args)[1][:, 1].sort().values[PROMPTS // 2 - 1 : PROMPTS // 2 + 1]
    head.bias[1] = -middle.mean()  # half the prompts above 0, half below, none near it
    path = tmp_path / "tied.onnx"
    export_decoder_graph(ReassociatedDecoder(tied, best_only=True).eval(), path)
    low, iou = PerSamDecoder(tied).eval()(*args)
    assert (iou[:, 2] == 0).all() and (iou[:, 3] == 0).all()
    best, logits, scores = host_best(low.numpy(), iou.numpy())
    assert set(best.tolist()) == {1, 2}
    out = OrtEngine(path, threads=2).run(_feeds(args))
    np.testing.assert_allclose(out["iou_predictions"], scores, atol=1e-5)
    np.testing.assert_allclose(out["low_res_masks"], logits, atol=MASK_LOGIT_ATOL)
    other = np.where(best == 2, 3, 2)  # the tied token not chosen (or, where 1 won, the first tied one)
    assert (np.abs(out["low_res_masks"] - low.numpy()[np.arange(PROMPTS), other]).max(axis=(1, 2)) > 1e-2).all()


def test_one_batched_call_equals_single_calls(tiny_engines):
    from persense.runtime.manifest import load_manifest

    manifest = load_manifest(tiny_engines)
    batched = SamEngines.from_manifest(manifest, "ort-cpu", threads=2, decode_chunk=64)
    single = SamEngines.from_manifest(manifest, "ort-cpu", threads=2, decode_chunk=1)
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(1, 256, 64, 64)).astype(np.float32)
    prompts = Prompts.points(rng.uniform(0, 1024, (64, 2)))
    guidance = Guidance(rng.normal(size=(1, 256)).astype(np.float32), rng.random((1, 4096)).astype(np.float32))
    one_call = batched.decode_best(embedding, prompts, guidance)
    many = single.decode_best(embedding, prompts, guidance)
    assert batched.decoder_launches == 1 and single.decoder_launches == 64
    np.testing.assert_allclose(one_call[0], many[0], atol=1e-4)
    np.testing.assert_allclose(one_call[1], many[1], atol=1e-5)
