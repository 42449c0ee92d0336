"""Where a distillation step's time goes, and what a smaller random crop saves (`aerialseg distil`).

    .venv/bin/python bench/bench_distil.py [--teacher NAME] [--student NAME] [--batch 8] [--sizes 256,192]
        [--rounds 3] [--quick] [--json out.json]

One synthetic batch of 256 px patches (the tiles' size) and, per ``train.patch_size`` in ``--sizes``:
- ``teacher fwd``: the frozen teacher's forward pass on the crop (no gradients), which distillation adds;
- ``student fwd+bwd``: the training loop's step (``aerialseg.training.loop.train_step``) without a teacher;
- ``distil step``: the same step with the teacher, as ``aerialseg distil`` runs it.
Models are set up as the loop sets them up (student channels_last, teacher frozen in eval mode). Variants
are interleaved round by round (the machine is shared); the table gives medians over rounds and each
figure's ratio to the distil step at the first size. ``--quick`` (tests): 64 px patches, crops 64/48,
batch 2, 1 round.
"""

import aerialseg  # noqa: F401  (first: offline defaults and OMP_WAIT_POLICY=PASSIVE, set before torch loads)
import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aerialseg.core.fileio import write_json
from aerialseg.core.timing import call_times_ms
from aerialseg.models import create_model, get_spec
from aerialseg.training import ddp
from aerialseg.training.losses import build_loss
from aerialseg.training.batch import random_crop, to_channels_last
from aerialseg.training.config import TrainConfig
from aerialseg.training.loop import Job, train_step
from aerialseg.training.optim import build_optimizer, build_scheduler
from aerialseg.training.weights import Teacher


def frozen_teacher(name: str) -> Teacher:
    """A random-init teacher frozen as ``load_teacher`` freezes a trained one (timing needs no weights)."""
    model = create_model(name, pretrained_encoder=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model.eval(), get_spec(name), name)


def student_job(student: str, crop: int, teacher: Teacher | None) -> Job:
    """A training-loop Job for the student at one ``train.patch_size`` (with or without the teacher)."""
    cfg = TrainConfig(model=student, patch_size=crop)
    model = to_channels_last(create_model(student, pretrained_encoder=False)).train()
    optimizer = build_optimizer(model, cfg)
    return Job(cfg, get_spec(student), model, model, build_loss(cfg.loss), optimizer,
               build_scheduler(optimizer, cfg, steps_per_epoch=1000), torch.amp.GradScaler("cpu", enabled=False),
               torch.device("cpu"), ddp.env_info(), teacher)


def step_functions(teacher: Teacher, student: str, images: torch.Tensor, masks: torch.Tensor,
                   crop: int) -> dict[str, Callable[[], Any]]:
    """The three timed functions at one crop size."""
    plain, distil = student_job(student, crop, None), student_job(student, crop, teacher)
    return {"teacher fwd": lambda: teacher.logits(*_cropped_images(images, masks, crop)),
            "student fwd+bwd": lambda: train_step(plain, images, masks),
            "distil step": lambda: train_step(distil, images, masks)}


def _cropped_images(images: torch.Tensor, masks: torch.Tensor, crop: int) -> tuple[torch.Tensor, tuple[int, int]]:
    images, masks = random_crop(images, masks, crop)
    return images.contiguous(memory_format=torch.channels_last), tuple(masks.shape[-2:])


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median ms of every (size, part) over interleaved rounds."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.patch, args.patch), dtype=torch.uint8, generator=gen)
    masks = torch.randint(0, 5, (args.batch, args.patch, args.patch), generator=gen)
    teacher = frozen_teacher(args.teacher)
    functions = {(size, part): fn for size in args.sizes
                 for part, fn in step_functions(teacher, args.student, images, masks, size).items()}
    times: dict[tuple[int, str], list[float]] = {key: [] for key in functions}
    for fn in functions.values():
        fn()  # warm-up: oneDNN primitive creation
    for _ in range(args.rounds):
        for key, fn in functions.items():
            times[key] += call_times_ms(fn, runs=1, warmup=0)
    base = statistics.median(times[(args.sizes[0], "distil step")])
    return [{"size": size, "part": part, "median_ms": round(statistics.median(v), 1),
             "x_distil_step_first_size": round(statistics.median(v) / base, 3)} for (size, part), v in times.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="unet_efficientnet_lite0")
    parser.add_argument("--student", default="unet_efficientnet_lite0_slim")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=256, help="patch side, px (tiles.size)")
    parser.add_argument("--sizes", default="256,192", help="train.patch_size crops to time")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CI size: 64 px patches, crops 64/48, batch 2, 1 round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    if args.quick:
        args.patch, args.sizes, args.batch, args.rounds = 64, [64, 48], 2, 1
    print(f"teacher {args.teacher}, student {args.student}, batch {args.batch} x {args.patch}², "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    rows = measure(args)
    print(f"{'size':>5} {'part':<16} {'median ms':>10} {'x distil step @' + str(args.sizes[0]):>20}")
    for row in rows:
        print(f"{row['size']:>5} {row['part']:<16} {row['median_ms']:>10.1f} {row['x_distil_step_first_size']:>20.3f}")
    if args.json:
        write_json(args.json, {"teacher": args.teacher, "student": args.student, "batch": args.batch, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
