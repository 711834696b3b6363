"""The density counters in plain PyTorch (CounTR, DSALVANet), their checkpoints and exports."""
