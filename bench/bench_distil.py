"""Where a distillation step's time goes, and what a smaller random crop saves (`aerialseg distil`).

    .venv/bin/python bench/bench_distil.py [--teacher NAME] [--student NAME] [--batch 8] [--sizes 256,192]
        [--rounds 3] [--quick] [--json out.json]

For each crop size, on one synthetic uint8 batch, with the models in channels_last as training runs them:
- ``teacher fwd``: the frozen teacher's forward pass (no gradients), which every distillation step adds;
- ``student fwd+bwd``: the student's forward, loss and backward pass;
- ``distil step``: the whole step as the training loop runs it (``aerialseg.training.train.train_step``).
Variants are interleaved round by round (the machine is shared); the table gives medians over rounds and
each figure's ratio to the distil step at the first size. ``--quick`` (tests): 64/48 px, batch 2, 1 round.
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
from aerialseg.training.train import Teacher, TrainConfig, forward_logits, to_channels_last
from aerialseg.training.losses import build_loss, distillation_kl


def models(teacher: str, student: str) -> tuple[Teacher, torch.nn.Module]:
    """A frozen random-init teacher and a trainable student, both channels_last (timing needs no weights)."""
    net = to_channels_last(create_model(teacher, pretrained_encoder=False)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return Teacher(net, get_spec(teacher), teacher), to_channels_last(create_model(student, pretrained_encoder=False))


def step_functions(teacher: Teacher, student: torch.nn.Module, student_name: str, batch: int,
                   size: int) -> dict[str, Callable[[], Any]]:
    """The three timed functions at one crop size, sharing one synthetic batch."""
    gen = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, 5, (batch, size, size), generator=gen)
    spec, loss_fn = get_spec(student_name), build_loss({"name": "ce"})
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    cfg = TrainConfig(model=student_name)

    def teacher_forward() -> None:
        teacher.logits(images, (size, size))

    def student_pass(with_teacher: bool) -> None:
        logits, _ = forward_logits(student, spec, images, train=True)
        loss = loss_fn(logits, masks)
        if with_teacher:
            loss = loss + cfg.alpha * distillation_kl(logits, teacher.logits(images, (size, size)), masks, 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {"teacher fwd": teacher_forward, "student fwd+bwd": lambda: student_pass(False),
            "distil step": lambda: student_pass(True)}


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median ms of every (size, part) over interleaved rounds."""
    teacher, student = models(args.teacher, args.student)
    functions = {(size, part): fn for size in args.sizes
                 for part, fn in step_functions(teacher, student, args.student, args.batch, size).items()}
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
    parser.add_argument("--sizes", default="256,192")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CI size: 64/48 px, batch 2, 1 round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    if args.quick:
        args.sizes, args.batch, args.rounds = [64, 48], 2, 1
    print(f"teacher {args.teacher}, student {args.student}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    rows = measure(args)
    print(f"{'size':>5} {'part':<16} {'median ms':>10} {'x distil step @' + str(args.sizes[0]):>20}")
    for row in rows:
        print(f"{row['size']:>5} {row['part']:<16} {row['median_ms']:>10.1f} {row['x_distil_step_first_size']:>20.3f}")
    if args.json:
        write_json(args.json, {"teacher": args.teacher, "student": args.student, "batch": args.batch, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
