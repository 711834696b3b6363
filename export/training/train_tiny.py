"""`persense-train-tiny`: train the tiny SAM on persense-synth scenes, so that it really segments.

Same I/O as the real models (1024 input, 256x64x64 embeddings, the standard prompt encoder and mask
decoder); trained on 256x256 windows of scenes resized into the 1024 frame (see train_data), two per
scene, then for a few steps on the whole frame, with point, box and multi-point prompts, SAM's losses and
multimask convention, plus the two decoder calls PerSense makes per point (a PerSAM-guided one, then one
with its best mask logits as input). Deterministic for a seed and thread count: step k's scene comes from
default_rng([seed, 0, k]), so a resumed run sees the same data. The result is written in
segment-anything's state-dict layout (FP16) with a JSON report of the held-out single-point IoU."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from persense.export.checkpoints import read_checkpoint
from persense.export.sam.build import random_sam
from persense.export.training.data import Crop, Prompts, sample_crops
from persense.export.training.evaluate import held_out_iou
from persense.export.training.model import CropDecoder, encode_crop, guidance, prior_loss, sam_loss
from persense.runtime.cli.common import add_common_flags, run_command
from persense.runtime.errors import PersenseError
from persense.runtime.geometry.transforms import LONG_SIDE
from persense.runtime.imageio import atomic_write_bytes, write_json

PROG = "persense-train-tiny"
MODEL = "tiny"
WARMUP = 100
# Scale of the prompt encoder's random Fourier frequencies (segment-anything's default is 1): an object-sized
# similarity kernel lets a small model learn to localise a prompt (docs/DESIGN.md "Tiny SAM recipe").
PE_SCALE = 3.0
ALIGN_GAIN = 2.0  # scale of the shared query/key map (see align_cross_attention)
CURRICULUM = 0.3  # share of the steps over which crops go from a few large objects to full crowds
# After the 256x256 windows, steps on SAM's whole 1024 frame: the decoder's token-to-image attention, trained over
# 256 cells, must learn the 4096 of inference (docs/DESIGN.md "Tiny SAM recipe").
FULL_FRAME_STEPS = 160
FULL_FRAME_LR = 5e-5  # constant learning rate of the whole-frame steps
# Whole-frame steps also train PerSAM's location prior (training.model.prior_loss): it places PerSense's first
# point and drives the SAM-only counter.
PRIOR_WEIGHT = 1.0
log = logging.getLogger(__name__)


def _tensors(prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prompt batch as torch tensors (coords, labels, targets)."""
    return torch.from_numpy(prompts.coords), torch.from_numpy(prompts.labels), torch.from_numpy(prompts.targets)


def crop_loss(
    sam: torch.nn.Module, decoder: CropDecoder, crop: Crop, prior_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss on one crop (with `prior_weight` x the location-prior loss) and the mean IoU of each prompt
    kind's chosen masks."""
    embedding = encode_crop(sam, torch.from_numpy(crop.image)[None], crop.offset)
    decoder.at(crop.offset, embedding.shape[-1])
    coords, labels, targets = _tensors(crop.points)
    target, attn_sim = guidance(embedding.detach(), torch.from_numpy(crop.reference))
    guided = torch.arange(len(coords)).remainder(2).float()  # every other point PerSAM-guided, as PerSense's first call
    low, iou = decoder.decode(embedding, coords, labels, target=target, attn_sim=attn_sim, guided=guided)
    first, first_iou = sam_loss(low, iou, targets, multimask=True)
    best = iou[:, 1:].argmax(1) + 1  # PerSense feeds back the best-scored mask's logits
    refined_input = low[torch.arange(len(best)), best][:, None].detach()
    low, iou = decoder.decode(embedding, coords, labels, mask_input=refined_input)
    second, second_iou = sam_loss(low, iou, targets, multimask=True)
    losses, stats = [first, second], {"point": float(first_iou.mean()), "refined": float(second_iou.mean())}
    for name, prompts in (("box", crop.boxes), ("multi", crop.multi)):
        coords, labels, targets = _tensors(prompts)
        low, iou = decoder.decode(embedding, coords, labels)
        loss, chosen = sam_loss(low, iou, targets, multimask=False)
        losses.append(loss)
        stats[name] = float(chosen.mean())
    if prior_weight:
        prior = prior_loss(embedding, torch.from_numpy(crop.reference), torch.from_numpy(crop.instances))
        losses.append(prior_weight * prior)
        stats["prior"] = float(prior.detach())
    return sum(losses), stats


def align_cross_attention(sam: torch.nn.Module, gain: float = ALIGN_GAIN) -> None:
    """Initialise each decoder cross-attention's key projection as its (scaled) query projection.

    Queries and keys then share one random map, so the dot product of a prompt's positional encoding with
    an image cell's is kept: from the first step a prompt attends to the cells at its position and back.
    (From an unrelated random init the decoder learns slowly to use its prompt: docs/DESIGN.md "Tiny SAM recipe".)
    """
    tf = sam.mask_decoder.transformer
    modules = [m for layer in tf.layers for m in (layer.cross_attn_token_to_image, layer.cross_attn_image_to_token)]
    with torch.no_grad():
        for attention in modules + [tf.final_attn_token_to_image]:
            attention.q_proj.weight.mul_(gain)
            attention.k_proj.weight.copy_(attention.q_proj.weight)


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_torch(obj: object, path: Path) -> bytes:
    """torch.save `obj` to `path` through atomic_write_bytes (temp file, fsync, os.replace); returns the bytes.

    torch names the zip's inner folder after the file it writes, so the object is staged as `<stem>.tmp` in a
    scratch folder next to `path` (the name this command always saved under): the bytes stay as they were.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".torch-save-", dir=path.parent) as scratch:
        staged = Path(scratch) / path.with_suffix(".tmp").name
        torch.save(obj, staged)
        data = staged.read_bytes()
    atomic_write_bytes(path, data)
    return data


def _save_state(
    path: Path, sam: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, args: argparse.Namespace
) -> None:
    """Write a resumable training checkpoint atomically."""
    state = {
        "model": sam.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "seed": args.seed,
        "steps": args.steps,
        "lr": args.lr,
    }
    _save_torch(state, path)


def _resume(path: Path, sam: torch.nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> int:
    """Load a training checkpoint written by the same command; returns the step to continue from."""
    state = read_checkpoint(path)
    for key in ("seed", "steps", "lr"):
        if state.get(key) != getattr(args, key):
            raise PersenseError(
                f"{path}: written with --{key} {state.get(key)}, not {getattr(args, key)}; "
                "resume with the same settings or start without --resume"
            )
    sam.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def export_weights(sam: torch.nn.Module, path: Path) -> str:
    """Write the weights in segment-anything's state-dict layout as FP16; returns the file's sha256."""
    state = {k: v.detach().half() if v.is_floating_point() else v.detach() for k, v in sam.state_dict().items()}
    return hashlib.sha256(_save_torch(state, path)).hexdigest()


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) the training and write the weights and the report; returns the report."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    sam = random_sam(MODEL, args.seed).train()
    frequencies = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    frequencies.mul_(PE_SCALE)  # standard normal at initialisation
    align_cross_attention(sam)
    decoder = CropDecoder(sam)
    optimizer = torch.optim.AdamW(sam.parameters(), lr=args.lr, weight_decay=1e-4)
    state_path = args.work / "train_state.pt"
    start = _resume(state_path, sam, optimizer, args) if args.resume and state_path.exists() else 0
    if args.resume and start == 0:
        log.warning("no checkpoint at %s; starting from step 0", state_path)
    began, window = time.monotonic(), []
    total = args.steps + args.full_frame_steps
    bar = tqdm(range(start, total), initial=start, total=total, desc=PROG, disable=args.quiet)
    for step in bar:
        rng = np.random.default_rng([args.seed, 0, step])
        if step < args.steps:
            easy = max(0.0, 1.0 - step / (CURRICULUM * args.steps))
            lr, crops, prior = learning_rate(step, args.steps, args.lr), sample_crops(rng, easy), 0.0
        else:
            lr, crops, prior = FULL_FRAME_LR, sample_crops(rng, windows=1, side=LONG_SIDE), PRIOR_WEIGHT
        for group in optimizer.param_groups:
            group["lr"] = lr
        results = [crop_loss(sam, decoder, crop, prior) for crop in crops]
        loss = sum(loss for loss, _ in results) / len(results)
        stats = {k: float(np.mean([s[k] for _, s in results])) for k in results[0][1]}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        optimizer.step()
        window = (window + [stats])[-50:]
        bar.set_postfix(
            loss=f"{loss.item():.3f}", **{k: f"{np.mean([s[k] for s in window if k in s]):.2f}" for k in stats}
        )
        if (step + 1) % args.save_every == 0 or step + 1 == total:
            _save_state(state_path, sam, optimizer, step + 1, args)
    sam.eval()
    digest = export_weights(sam, args.out)
    report = {
        "model": MODEL,
        "weights": str(args.out),
        "sha256": digest,
        "seed": args.seed,
        "steps": args.steps,
        "full_frame_steps": args.full_frame_steps,
        "lr": args.lr,
        "train_seconds_this_run": round(time.monotonic() - began, 1),
        "held_out": held_out_iou(sam, args.seed, args.eval_scenes),
    }
    write_json(args.report or args.out.with_suffix(".json"), report)
    return report


def _parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/tiny_sam.pt"), help="weights file to write")
    parser.add_argument("--report", type=Path, help="JSON report (default: --out with .json)")
    parser.add_argument("--work", type=Path, default=Path("train_tiny"), help="folder for resumable checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from --work/train_state.pt")
    parser.add_argument(
        "--steps", type=int, default=2000, help="steps on two 256x256 windows of one scene each (default 2000)"
    )
    parser.add_argument(
        "--full-frame-steps",
        type=int,
        default=FULL_FRAME_STEPS,
        help=f"then steps on one whole 1024 frame each (default {FULL_FRAME_STEPS}; may change on "
        "--resume: these steps only append)",
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    parser.add_argument("--eval-scenes", type=int, default=8, help="held-out 768x576 scenes (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the result depends on it)")
    add_common_flags(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    """Train, then print the report's headline."""
    if args.steps < 1 or args.save_every < 1 or args.eval_scenes < 1 or args.full_frame_steps < 0:
        raise PersenseError("--steps, --save-every and --eval-scenes must be at least 1, --full-frame-steps at least 0")
    report = train(args)
    held = report["held_out"]
    print(
        f"{PROG}: held-out mean single-point IoU {held['mean_iou']:.3f} over {held['masks']} instances in "
        f"{held['scenes']} scenes ({100 * held['iou_above_0.8']:.0f}% above 0.8); weights {report['weights']} "
        f"sha256 {report['sha256']}"
    )
    print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on a user error (one line on stderr), 1 on a crash."""
    return run_command(PROG, _run, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
