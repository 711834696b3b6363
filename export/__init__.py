"""PyTorch side of persense: model definitions, checkpoint loading, ONNX export, the reference pipeline."""
