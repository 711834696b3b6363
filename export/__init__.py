"""PyTorch side of persense: model definitions, checkpoint loading, ONNX export, the PyTorch oracle."""
