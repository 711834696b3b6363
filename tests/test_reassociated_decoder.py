"""The exported decoder's CPU layout (issue 13): its rewritten image-to-token attention equals the stock one, and
ONNX Runtime's optimised graph runs no SkipLayerNormalization or BiasGelu over image-sized tensors, no Softmax over
a few-token axis of them and no per-prompt 256-channel convolution or transpose (the forms measured slower on the CPU;
see export/fast_decoder.py)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from persense.export.sam.graphs import decoder_example_inputs, export_decoder_graph
from persense.export.sam.persam_decoder import PerSamDecoder
from persense.export.sam.reassociated_decoder import ReassociatedDecoder, image_to_tokens

IMAGE_TOKENS = 64 * 64
SLOW_OVER_IMAGE = ("SkipLayerNormalization", "BiasGelu")
LAYOUT_OPS = ("Conv", "Transpose", "ReorderOutput")


@pytest.mark.parametrize("batch,tokens", [(1, 7), (3, 8), (5, 6)])
@torch.no_grad()
def test_image_to_tokens_equals_the_stock_attention(tiny_sam, batch, tokens):
    g = torch.Generator().manual_seed(batch)
    for layer in tiny_sam.mask_decoder.transformer.layers:
        module = layer.cross_attn_image_to_token
        for linear in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            assert linear.bias.abs().max() > 0  # the biases the rewrite moves are really there
        image = torch.randn(batch, IMAGE_TOKENS, module.embedding_dim, generator=g)
        few = torch.randn(batch, tokens, module.embedding_dim, generator=g) * 3
        values = torch.randn(batch, tokens, module.embedding_dim, generator=g)
        torch.testing.assert_close(
            image_to_tokens(module, image, few, values), module(q=image, k=few, v=values), atol=1e-5, rtol=1e-4
        )


@pytest.fixture(scope="module")
def profiled_ops(tiny_sam, tmp_path_factory) -> list[tuple[str, list[int]]]:
    """(op type, output shape) of every kernel ONNX Runtime ran for one 4-prompt launch of the exported decoder,
    with the runtime's optimisation level."""
    folder = tmp_path_factory.mktemp("fast_decoder")
    path = folder / "sam_decoder.onnx"
    with torch.no_grad():
        export_decoder_graph(ReassociatedDecoder(tiny_sam, best_only=True).eval(), path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {name: t.numpy() for name, t in zip(PerSamDecoder.input_names, decoder_example_inputs(4))})
    with open(session.end_profiling()) as file:
        events = json.load(file)
    return [
        (e["args"]["op_name"], list(next(iter(e["args"]["output_type_shape"][0].values()))))
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    ]


def test_no_slow_op_form_runs_over_image_sized_tensors(profiled_ops):
    over_image = [(op, shape) for op, shape in profiled_ops if int(np.prod(shape)) >= 4 * IMAGE_TOKENS * 4]
    assert {"LayerNormalization", "Gelu", "Gemm"} <= {op for op, _ in over_image}  # what runs instead
    assert not [(op, shape) for op, shape in over_image if op in SLOW_OVER_IMAGE]
    softmax_axes = [shape[-1] for op, shape in over_image if op == "Softmax"]
    assert softmax_axes and min(softmax_axes) == IMAGE_TOKENS  # token-to-image only; never over the few tokens
    # the dense prompt joins the image tokens token-major: only the mask branch's 4- and 16-channel maps are NCHW
    per_prompt_256 = 4 * IMAGE_TOKENS * 256
    assert not [(op, shape) for op, shape in over_image if op in LAYOUT_OPS and int(np.prod(shape)) >= per_prompt_256]
