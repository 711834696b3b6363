"""Decoder batching and encoder precision on a CUDA GPU, measured with torch on the exported modules.

`python -m persense.benchmarks.torch_cuda --model vit_h --prompts 150` times, on the same random weights:
- the reference's decoder stage: one PerSAM decoder call per prompt, all three candidate masks
  post-processed to the image size and copied to the host, as the original predictor does;
- the runtime's: one call of the exported (re-associated) decoder for all prompts, only the chosen
  mask of each prompt upsampled, in FP32 and FP16;
- the image encoder in FP32 and FP16.
It is the GPU measurement for machines where ONNX Runtime-GPU or TensorRT are not installed; it
runs the same modules that `persense-export` exports. JSON goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from persense.export.sam.build import random_sam
from persense.export.sam.persam_decoder import PerSamDecoder
from persense.export.sam.reassociated_decoder import ReassociatedDecoder
from persense.runtime.geometry.transforms import GRID, LONG_SIDE, LOW_RES
from persense.runtime.metrics import midpoint_median
from persense.runtime.models.sam import EMBED_DIM

IMAGE_SIZE = (768, 1024)  # H, W of the synthetic target image
PER_PROMPT = {1, 2, 3, 4, 7}  # decoder inputs with a prompt axis (coords, labels, mask, has_mask, persam weight)


def _timed(fn: Callable[[], object], device: torch.device, repeat: int) -> list[float]:
    """Milliseconds of `repeat` runs after two warm-ups, synchronising the device around each run."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _inputs(prompts: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One embedding and `prompts` one-point prompts (plus padding points), unguided."""
    g = torch.Generator().manual_seed(0)
    coords = torch.cat([torch.rand(prompts, 1, 2, generator=g) * LONG_SIDE, torch.zeros(prompts, 1, 2)], dim=1)
    labels = torch.tensor([[1.0, -1.0]]).repeat(prompts, 1)
    tensors = (
        torch.randn(1, EMBED_DIM, GRID, GRID, generator=g),
        coords,
        labels,
        torch.zeros(prompts, 1, LOW_RES, LOW_RES),
        torch.zeros(prompts),
        torch.zeros(1, EMBED_DIM),
        torch.zeros(1, GRID * GRID),
        torch.zeros(prompts),
    )
    return tuple(t.to(device=device, dtype=dtype) for t in tensors)


def _postprocess(low_res: torch.Tensor) -> torch.Tensor:
    """SAM's postprocess_masks for a 1024x768 input: to 1024^2, crop, to the image size; then > 0."""
    h, w = IMAGE_SIZE
    full = F.interpolate(low_res, (LONG_SIDE, LONG_SIDE), mode="bilinear", align_corners=False)[..., :h, :w]
    return F.interpolate(full, IMAGE_SIZE, mode="bilinear", align_corners=False) > 0


@torch.no_grad()
def measure(model_type: str, prompts: int, repeat: int, device: torch.device) -> dict[str, object]:
    """All timings as a JSON-ready dict."""
    sam = random_sam(model_type, 0).to(device)
    literal, fast = PerSamDecoder(sam).eval(), ReassociatedDecoder(sam, best_only=True).eval()
    inputs = _inputs(prompts, device, torch.float32)

    def sequential() -> None:
        for i in range(prompts):
            one = [t[i : i + 1] if k in PER_PROMPT else t for k, t in enumerate(inputs)]
            low, iou = literal(*one)
            masks = _postprocess(low[:, 1:])
            masks.cpu(), iou.cpu()  # the original predictor returns numpy arrays

    def batched(module: torch.nn.Module, feeds: tuple[torch.Tensor, ...]) -> Callable[[], None]:
        def run() -> None:
            chosen, _ = module(*feeds)  # the best multimask output, chosen in the module as in the graph
            _postprocess(chosen[:, None].float()).cpu()

        return run

    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model_type": model_type,
        "prompts": prompts,
    }
    result["decoder_sequential_fp32_ms"] = midpoint_median(_timed(sequential, device, max(1, repeat // 5)))
    result["decoder_batched_fp32_ms"] = midpoint_median(_timed(batched(fast, inputs), device, repeat))
    result["decoder_module_only_fp32_ms"] = midpoint_median(_timed(lambda: fast(*inputs), device, repeat))
    result["literal_decoder_module_only_fp32_ms"] = midpoint_median(_timed(lambda: literal(*inputs), device, repeat))
    half = ReassociatedDecoder(sam, best_only=True).eval().half() if device.type == "cuda" else None
    if half is not None:
        result["decoder_batched_fp16_ms"] = midpoint_median(
            _timed(batched(half, _inputs(prompts, device, torch.float16)), device, repeat)
        )
        half.float()
    image = torch.randn(1, 3, LONG_SIDE, LONG_SIDE, device=device)
    encoder = sam.image_encoder
    result["encoder_fp32_ms"] = midpoint_median(_timed(lambda: encoder(image), device, repeat))
    if device.type == "cuda":
        encoder.half()
        result["encoder_fp16_ms"] = midpoint_median(_timed(lambda: encoder(image.half()), device, repeat))
    result["decoder_speedup_fp32"] = result["decoder_sequential_fp32_ms"] / result["decoder_batched_fp32_ms"]
    if "decoder_batched_fp16_ms" in result:
        result["decoder_speedup_fp16"] = result["decoder_sequential_fp32_ms"] / result["decoder_batched_fp16_ms"]
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m persense.benchmarks.torch_cuda",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="vit_h", help="SAM type (random weights)")
    parser.add_argument("--prompts", type=int, default=150, help="prompts in the decoder stage")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model, args.prompts, args.repeat, torch.device(args.device)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
