"""persense-export: SAM (and optionally a counter, a text detector, PerSense++'s feature engine) to ONNX engines
plus engines/manifest.json."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from persense.runtime.cli.common import add_common_flags, run_command
from persense.runtime.errors import PersenseError

log = logging.getLogger("persense.export")

DEFAULT_WEIGHTS = Path("weights")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    from persense.export.grounding_dino.model import DETECTOR_CONFIGS
    from persense.export.sam.build import SAM_CONFIGS
    from persense.export.sam.gpu_encoder import ATTENTION_FORMS, DEFAULT_FORM

    parser = argparse.ArgumentParser(prog="persense-export", description=__doc__)
    parser.add_argument(
        "--model",
        choices=list(SAM_CONFIGS),
        help="SAM variant (default vit_h; with --detector and no --model, only the detector)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help=f"original SAM checkpoint (default: {DEFAULT_WEIGHTS}/<official file name> if present)",
    )
    parser.add_argument("--random-weights", action="store_true", help="random weights instead of a checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    parser.add_argument("--out", type=Path, default=Path("engines"), help="output folder (default engines/)")
    parser.add_argument("--force", action="store_true", help="re-export even if the folder has matching artefacts")
    parser.add_argument("--counter", choices=["countr", "dsalvanet"], help="also export this density counter")
    parser.add_argument(
        "--counter-checkpoint",
        type=Path,
        help="original counter checkpoint (CounTR FSC147.pth / DSALVANet checkpoint_200.pth); "
        "random weights when absent",
    )
    parser.add_argument(
        "--counter-config",
        choices=["base", "tiny"],
        default="base",
        help="CounTR size: base (the original) or tiny (same I/O, for tests)",
    )
    parser.add_argument(
        "--detector",
        choices=DETECTOR_CONFIGS,
        help="also export the Grounding DINO detector for --text: grounding-dino (Swin-T OGC) or "
        "grounding-dino-tiny (a small random-weight configuration for tests and the demo)",
    )
    parser.add_argument(
        "--detector-checkpoint",
        type=Path,
        help="Hugging Face Grounding DINO checkpoint folder (config.json, model.safetensors or "
        "pytorch_model.bin, tokenizer files) or the original groundingdino_swint_ogc.pth "
        "(its tokenizer from --detector-tokenizer or its folder); random weights with "
        "--random-weights",
    )
    parser.add_argument(
        "--detector-tokenizer",
        type=Path,
        help="the checkpoint's tokenizer (tokenizer.json or vocab.txt) when its folder has none; "
        "parity with a real checkpoint needs its real tokenizer (random weights get a small "
        "generated vocabulary)",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="also write FP16 ONNX models (<name>_fp16) and, where TensorRT and a GPU are usable, "
        "TensorRT FP16 engines (<name>_trt)",
    )
    parser.add_argument(
        "--gpu-encoder",
        nargs="?",
        const=DEFAULT_FORM,
        choices=ATTENTION_FORMS,
        metavar="FORM",
        help="also write sam_encoder_gpu, the encoder persense-infer uses on ort-cuda: every attention "
        "one fused attention with the relative positions as an additive bias, no CPU row blocks "
        "(with --fp16 also sam_encoder_gpu_fp16). FORM: attention (default; ONNX Attention, "
        "opset 23), mha (ONNX Runtime's com.microsoft.MultiHeadAttention), decomposed "
        "(MatMul/Softmax, opset 18) or folded (the bias folded into a mask-free ONNX Attention); "
        "not used by TensorRT, which keeps sam_encoder",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write INT8 SAM models (<name>_int8, ONNX Runtime dynamic quantisation) for the CPU",
    )
    parser.add_argument(
        "--openvino-int8",
        action="store_true",
        help="also write sam_encoder_ov_int8 (OpenVINO IR, NNCF quantisation calibrated on persense-synth "
        "scenes) for --backend openvino --precision int8 (the openvino extra)",
    )
    parser.add_argument(
        "--method",
        choices=["persense", "persense++"],
        default="persense",
        help="persense++ also exports what PerSense++ needs: its ResNet-50 feature engine (added to an existing "
        "folder on its own, or with --model); persense (default) adds nothing",
    )
    parser.add_argument(
        "--feature-checkpoint",
        type=Path,
        help="torchvision's resnet50-0676ba61.pth for --method persense++ (default: the torch hub cache's, "
        "$TORCH_HOME/hub/checkpoints/, if present; random weights with --random-weights)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare every engine in --out with the PyTorch model and print a table; "
        "exit 1 on a failure (nothing is exported)",
    )
    add_common_flags(parser)
    return parser


def _export(args: argparse.Namespace) -> int:
    """Export the requested artefacts and write the manifest (or, with --check, compare them with torch)."""
    from persense.export.exporter import ExportRequest, export_all, resolve_checkpoint

    if args.check:
        from persense.export.parity import check_parity, format_table, parity_ok

        checkpoints = (args.checkpoint, args.counter_checkpoint, args.feature_checkpoint)
        rows = check_parity(args.out, [p for p in checkpoints if p], args.seed)
        print(format_table(rows))
        return 0 if parity_ok(rows) else 1

    plusplus = args.method == "persense++"
    model = args.model or (None if args.detector or plusplus else "vit_h")
    checkpoint = resolve_checkpoint(model, args.checkpoint, args.random_weights, DEFAULT_WEIGHTS) if model else None
    feature_checkpoint = None
    if plusplus:
        from persense.export.features.resnet import resolve_feature_checkpoint

        feature_checkpoint = resolve_feature_checkpoint(args.feature_checkpoint, args.random_weights)
    if args.detector and args.detector_checkpoint is None and not args.random_weights:
        raise PersenseError(
            f"no detector checkpoint: pass --detector-checkpoint FOLDER (a Hugging Face "
            f"{args.detector} checkpoint) or --random-weights"
        )
    request = ExportRequest(
        model_type=model,
        checkpoint=checkpoint,
        seed=args.seed,
        out=args.out,
        force=args.force,
        counter=args.counter,
        counter_checkpoint=args.counter_checkpoint,
        counter_config=args.counter_config,
        fp16=args.fp16,
        int8=args.int8,
        openvino_int8=args.openvino_int8,
        gpu_encoder=args.gpu_encoder,
        detector=args.detector,
        detector_checkpoint=args.detector_checkpoint,
        detector_tokenizer=args.detector_tokenizer,
        features=plusplus,
        feature_checkpoint=feature_checkpoint,
    )
    manifest_path, note = export_all(request)
    if note:
        print(note)
    print(f"wrote {manifest_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of persense-export."""
    args = build_parser().parse_args(argv)
    if args.checkpoint is not None and args.random_weights:
        raise SystemExit("persense-export: error: --checkpoint and --random-weights exclude each other")
    if args.detector_checkpoint is not None and args.random_weights:
        raise SystemExit("persense-export: error: --detector-checkpoint and --random-weights exclude each other")
    if args.feature_checkpoint is not None and args.random_weights:
        raise SystemExit("persense-export: error: --feature-checkpoint and --random-weights exclude each other")
    if args.feature_checkpoint is not None and args.method != "persense++":
        raise SystemExit("persense-export: error: --feature-checkpoint needs --method persense++")
    return run_command("persense-export", _export, args)


if __name__ == "__main__":
    sys.exit(main())
