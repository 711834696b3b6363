"""Test helper for --method persense++: a feature engine with the contract's I/O (FEATURES_IO) and a constant
output, so bad-input cases that need one do not pay for a ResNet-50 export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def add_constant_feature_engine(folder: Path) -> Path:
    """Add `resnet50_features` (ones, whatever the image) to the engines folder's manifest."""
    from persense.export.artefacts import describe
    from persense.runtime.artefact_names import FEATURES
    from persense.runtime.manifest import load_manifest
    from persense.runtime.models.features import FEATURES_IO

    (image,), (features,) = FEATURES_IO
    inputs = [helper.make_tensor_value_info(image.name, TensorProto.FLOAT, list(image.shape))]
    outputs = [helper.make_tensor_value_info(features.name, TensorProto.FLOAT, list(features.shape))]
    constant = numpy_helper.from_array(np.ones(features.shape, np.float32), "constant")
    nodes = [helper.make_node("Identity", ["constant"], [features.name])]
    graph = helper.make_graph(nodes, "constant_features", inputs, outputs, [constant])
    path = folder / f"{FEATURES}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    manifest = load_manifest(folder)
    manifest.artefacts[FEATURES] = describe(path, FEATURES, "fp32", "constant-test-features", "random", {})
    manifest.save()
    return folder
