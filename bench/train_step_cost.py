"""Training step time of two recipe variants side by side.

    .venv/bin/python bench/train_step_cost.py [--compare exit_head|mixed_subnets]
        [--model resnet20_adn] [--steps 48] [--bf16 auto|off]

``--compare exit_head``: the ResNet-ADN exit heads, one-conv against pyramid
(``model_kwargs = {"exit_head": ...}``). ``--compare mixed_subnets``: 0 against 1 mixed
sub-network trained per step. Two trainers of the default recipe (``train.config.TrainConfig``),
identical but for that option, run the same batches: a few warm-up steps each, then alternating
blocks of 4 timed steps of ``Trainer.train_step`` (super-net and base-net forward, ADNLoss with
L_depth, backward, optimizer and scheduler step). Prints the median step time of each and their
ratio (one run, no spread across runs).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

#: comparison -> its two arms (name, TrainConfig overrides); the ratio is second / first.
ARMS: dict[str, tuple[tuple[str, dict], tuple[str, dict]]] = {
    "exit_head": (("conv", {"model_kwargs": {"exit_head": "conv"}}),
                  ("pyramid", {"model_kwargs": {"exit_head": "pyramid"}})),
    "mixed_subnets": (("mixed=0", {"mixed_subnets": 0}), ("mixed=1", {"mixed_subnets": 1})),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", choices=sorted(ARMS), default="exit_head")
    p.add_argument("--model", default="resnet20_adn")
    p.add_argument("--steps", type=int, default=48, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", choices=("auto", "off"), default="auto",
                   help="auto: bf16 autocast where the CPU has native bf16 (the recipe's default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from train.config import TrainConfig
    from train.data import iterate_batches
    from train.trainer import Trainer

    arms = ARMS[args.compare]
    names = [name for name, _ in arms]
    trainers = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        for i, (name, overrides) in enumerate(arms):
            torch.manual_seed(0)
            cfg = TrainConfig(model=args.model, out=f"{tmp}/{i}", **overrides,
                              bf16="auto" if args.bf16 == "auto" else False)
            trainers[name] = Trainer(cfg, log=lambda _m: None)
        return _time(args, trainers, names)


def _time(args: argparse.Namespace, trainers: dict, names: list[str]) -> int:
    import torch

    from train.data import iterate_batches

    first = trainers[names[0]]
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i, (images, labels) in enumerate(iterate_batches(first.data.train, first.cfg.batch_size,
                                                         shuffle=True, generator=gen,
                                                         drop_last=True)):
        batches.append((first._prepare(images, i), labels))
        if len(batches) >= args.warmup + args.steps:
            break

    for tr in trainers.values():
        tr.step_module.train()
        for x, y in batches[:args.warmup]:
            tr.train_step(x, y)
    times: dict[str, list[float]] = {n: [] for n in names}
    timed = batches[args.warmup:]
    block = 4
    for bi, s in enumerate(range(0, len(timed), block)):
        for j in range(len(names)):
            name = names[(bi + j) % len(names)]
            for x, y in timed[s:s + block]:
                t0 = time.perf_counter()
                trainers[name].train_step(x, y)
                times[name].append(time.perf_counter() - t0)
    med = {h: float(np.median(v)) for h, v in times.items()}
    bs = first.cfg.batch_size
    print(f"# {' '.join([sys.executable, *sys.argv])}")
    print(f"# {args.model}, {first.data.name}, batch {bs}, bf16 {first.bf16}, "
          f"{torch.get_num_threads()} threads, {len(timed)} timed steps per arm")
    for n in names:
        print(f"{n:<8} median step {1e3 * med[n]:7.1f} ms  ({bs / med[n]:.0f} images/s)")
    print(f"{names[1]} / {names[0]} step time: {med[names[1]] / med[names[0]]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
