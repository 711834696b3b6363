"""PerSense++'s ResNet-50 feature engine: torchvision's layout, its checkpoint, and the backbone's ONNX export."""
