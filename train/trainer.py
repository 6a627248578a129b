"""The training loop: ADN super-net/base-net self-distillation, optional L_depth, DDP, resume."""
from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from train.checkpoint import (load_checkpoint, load_init_weights, part_parameter_names,
                              save_checkpoint)
from train.config import TrainConfig
from train.data import (DatasetBundle, augment_batch, iterate_batches, load_dataset,
                        normalize_batch, num_batches)
from train.distributed import DistContext, all_reduce_mean, barrier, init_distributed
from train.ema import ModelEMA
from train.evaluate import evaluate_configs
from train.losses import ADNLoss, DepthLoss, costs_from_macs
from train.models import create_model
from train.models.base import AdaptiveDepthNet, SkipConfig, all_skip_configs, is_mixed, skip_to_str
from train.models.macs import macs_per_exit, piece_macs
from train.precision import resolve_bf16
from train.schedule import build_optimizer, build_scheduler, param_groups
from runtime.errors import UsageError

CHECKPOINT_NAME = "checkpoint.pt"
FINAL_NAME = "model.pt"


class ADNStep(nn.Module):
    """Super-net, base-net and the step's mixed sub-networks in one forward, so DDP sees one
    forward per backward."""

    def __init__(self, model: AdaptiveDepthNet, self_distill: bool) -> None:
        super().__init__()
        self.model = model
        self.self_distill = self_distill

    def forward(self, x: Tensor, mixed: Sequence[SkipConfig] = ()):
        super_logits, increments = self.model(x, skip=None, return_increments=True)
        if not self.self_distill:
            return super_logits, None, increments, []
        # Mixed configurations that start with skips share those stages with the base-net.
        base_logits, *mixed_logits = self.model.forward_configs(x, [(True,) * self.model.num_stages, *mixed])
        return super_logits, base_logits, increments, list(zip(mixed, mixed_logits))


def mixed_skip_configs(num_stages: int) -> list[SkipConfig]:
    """The skip configurations that skip some stages but not all (2^S - 2 of them)."""
    return [c for c in all_skip_configs(num_stages) if is_mixed(c)]


def draw_mixed_configs(configs: Sequence[SkipConfig], count: int, seed: int, step: int) -> list[SkipConfig]:
    """``count`` distinct configurations of ``configs`` drawn at random; the same for the same
    (seed, step), so a resumed run and every DDP rank draw what an uninterrupted run draws."""
    if count == 0:
        return []
    rng = random.Random(seed * 1_000_003 + step)
    return rng.sample(list(configs), min(count, len(configs)))


class Trainer:
    """Trains one model from a :class:`TrainConfig`; ``fit()`` returns the final summary."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.ctx = ctx or init_distributed()
        self.log = log if self.ctx.is_main else (lambda _msg: None)
        self.out = Path(cfg.out)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.data: DatasetBundle = load_dataset(cfg.data, cfg.data_root, val_fraction=cfg.val_fraction,
                                                split_seed=cfg.split_seed, img_size=cfg.img_size)
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.model, num_classes=len(self.data.class_names),
                                  in_chans=self.data.in_chans, img_size=self.data.img_size,
                                  **(cfg.model_kwargs or {}))
        if cfg.init_weights:
            self.log(f"initial weights: {load_init_weights(self.model, cfg.init_weights)}")
        self.model.to(self.ctx.device)
        self.frozen_modules = self._freeze(cfg.trainable)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.input_size = self.data.img_size
        self.loss_fn = self._build_loss().to(self.ctx.device)
        step = ADNStep(self.model, cfg.self_distill)
        self.mixed_configs = mixed_skip_configs(self.model.num_stages)
        if cfg.mixed_subnets and not self.mixed_configs:
            raise UsageError(f"mixed_subnets = {cfg.mixed_subnets}, but {cfg.model} has one stage: "
                             "no skip configuration is mixed")
        # None (the default): one mixed configuration per step where it can be distilled and the
        # trunk trains (a frozen trunk keeps the recipe it had)
        self.mixed_subnets = (int(cfg.self_distill and bool(self.mixed_configs)
                                  and cfg.trainable == "all")
                              if cfg.mixed_subnets is None else cfg.mixed_subnets)
        self.step_module: nn.Module = (
            nn.parallel.DistributedDataParallel(step) if self.ctx.enabled else step)
        self.optimizer = build_optimizer(param_groups([self.model, self.loss_fn], cfg.weight_decay), cfg)
        self.steps_per_epoch = num_batches(len(self.data.train), cfg.batch_size,
                                           self.ctx.world_size, drop_last=True)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema else None
        self.bf16 = resolve_bf16(cfg.bf16, self.ctx.device)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0

    # ----------------------------------------------------------------------------- set-up
    def _build_loss(self) -> ADNLoss:
        cfg, S = self.cfg, self.model.num_stages
        depth = None
        if cfg.depth_loss:
            if cfg.depth_costs is not None:
                if len(cfg.depth_costs) != S:
                    raise UsageError(f"depth_costs has {len(cfg.depth_costs)} values, the model has {S} exits")
                total = float(sum(cfg.depth_costs))
                costs = [c / total for c in cfg.depth_costs]
            else:
                # Heads of earlier exits are run on the way, so they count in the cost too.
                pieces = piece_macs(self.model, self.input_size)
                costs = costs_from_macs(macs_per_exit(self.model, (False,) * S, pieces=pieces),
                                        head_macs=pieces["head"])
            depth = DepthLoss(costs, lam=cfg.depth_lambda, halting=cfg.depth_halting,
                              tau=cfg.depth_tau, temperature=cfg.depth_temperature, beta=cfg.depth_beta)
        return ADNLoss(S, exit_weights=cfg.exit_weights, alpha=cfg.alpha if cfg.self_distill else 1.0,
                       temperature=cfg.kd_temperature, label_smoothing=cfg.label_smoothing, depth=depth,
                       distill_from=cfg.distill_from, depth_on=cfg.depth_on)

    def _freeze(self, trainable: str) -> list[nn.Module]:
        """Freeze every parameter outside the trainable parts (``exits``: the exit heads;
        ``exits+last``: and the last stage; ``all``: nothing), found through the model's cut
        points. Returns the modules to keep in eval mode while training (every module whose
        parameters are all frozen: its BatchNorm statistics and dropout stay fixed)."""
        if trainable == "all":
            return []
        parts = ("heads", "last_stage") if trainable == "exits+last" else ("heads",)
        keep = part_parameter_names(self.model, parts)
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in keep)
        frozen = [m for m in self.model.modules() if m is not self.model
                  and any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        self.log(f"trainable: {trainable} ({n_train / 1e6:.3f} M of {n_all / 1e6:.3f} M parameters; "
                 "the rest frozen, its norms in eval mode)")
        return frozen

    def _train_mode(self) -> None:
        self.step_module.train()
        for m in self.frozen_modules:
            m.eval()

    def _state(self) -> dict[str, Any]:
        return {
            # A registered name, a plugin name or a "module:factory" spec, and the factory's kwargs.
            "model_name": self.cfg.model,
            "model_config": {**(self.cfg.model_kwargs or {}), **self.model.model_config()},
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "torch_rng": torch.get_rng_state(),
            "config": self.cfg.to_dict(),
            "dataset": self.data.info(),
        }

    def save(self, name: str = CHECKPOINT_NAME) -> Path | None:
        if not self.ctx.is_main:
            return None
        return save_checkpoint(self._state(), self.out / name)

    def resume(self, path: str | Path | None = None) -> None:
        """Continue exactly where ``path`` (default: the run's checkpoint) left off."""
        path = Path(path) if path else self.out / CHECKPOINT_NAME
        state = load_checkpoint(path)
        saved = TrainConfig.from_dict(state["config"], source=str(path))
        for name in ("model", "model_kwargs", "trainable", "data", "batch_size", "epochs", "seed",
                     "split_seed", "val_fraction"):
            if getattr(saved, name) != getattr(self.cfg, name):
                raise UsageError(f"cannot resume {path}: {name} was {getattr(saved, name)!r}, "
                                 f"now {getattr(self.cfg, name)!r}")
        self.model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict({"module": state["ema"], "updates": state["ema_updates"]})
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed {path} at epoch {self.epoch + 1}, step {self.step_in_epoch}")

    # ----------------------------------------------------------------------------- loop
    def _batch_generator(self, purpose: int, *index: int) -> torch.Generator:
        """A generator seeded from (seed, purpose, epoch/step, rank): resumable anywhere."""
        seed = self.cfg.seed
        for i in (purpose, *index, self.ctx.rank):
            seed = (seed * 1_000_003 + i) % (2 ** 63)
        return torch.Generator().manual_seed(seed)

    def _prepare(self, images: Tensor, step: int) -> Tensor:
        if self.cfg.augment:
            images = augment_batch(images, self.data.augment, self._batch_generator(2, step))
        x = normalize_batch(images, self.data.mean, self.data.std, channels_last=self.cfg.channels_last)
        return x.to(self.ctx.device, non_blocking=True)

    def train_step(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], dict[str, float]]:
        """One optimizer step on a prepared batch: super-net and base-net forward, the loss,
        backward, optimizer, scheduler (and EMA) step. Returns the super-net's exit logits and
        the loss terms; raises FloatingPointError when the loss is not finite."""
        mixed = draw_mixed_configs(self.mixed_configs, self.mixed_subnets, self.cfg.seed, self.global_step)
        with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            super_logits, base_logits, increments, mixed_logits = self.step_module(x, mixed)
            loss, terms = self.loss_fn(super_logits, base_logits, y, increments, mixed_logits)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.global_step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return super_logits, terms

    def train_epoch(self) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        self._train_mode()
        order = self._batch_generator(1, self.epoch)
        batches = iterate_batches(self.data.train, cfg.batch_size, shuffle=True, generator=order,
                                  rank=ctx.rank, world_size=ctx.world_size, drop_last=True)
        totals: dict[str, float] = {}
        seen = correct = steps_done = 0
        start = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not ctx.is_main,
                   desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="it", mininterval=1.0,
                   dynamic_ncols=True, leave=True)
        for i, (images, labels) in enumerate(batches):
            if i < self.step_in_epoch:
                continue  # resuming mid-epoch: this batch was already trained on
            x, y = self._prepare(images, self.global_step), labels.to(ctx.device)
            super_logits, terms = self.train_step(x, y)
            self.step_in_epoch += 1
            self.global_step += 1
            steps_done += 1
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            seen += len(y)
            correct += int((super_logits[-1].argmax(1) == y).sum())
            if ctx.is_main and (self.step_in_epoch % 20 == 0 or self.step_in_epoch == self.steps_per_epoch):
                bar.set_postfix(loss=f"{terms['loss']:.3f}", acc=f"{correct / max(seen, 1):.3f}",
                                img_s=f"{seen * ctx.world_size / (time.perf_counter() - start):.0f}",
                                refresh=False)
            bar.update(1)
            if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0:
                self.save()
            if cfg.max_steps and self.global_step >= cfg.max_steps:
                break
        bar.close()
        means = torch.tensor([totals[k] / max(1, steps_done) for k in sorted(totals)]
                             + [correct / max(seen, 1)])
        means = all_reduce_mean(means, ctx).tolist()
        stats = dict(zip(sorted(totals), means[:-1]))
        stats["train_acc"] = means[-1]
        stats["epoch_seconds"] = time.perf_counter() - start
        stats["images_per_second"] = seen * ctx.world_size / stats["epoch_seconds"]
        return stats

    def eval_model(self) -> AdaptiveDepthNet:
        return self.ema.module if self.ema is not None else self.model

    def validate(self) -> dict[str, Any]:
        S = self.model.num_stages
        configs = [(False,) * S, (True,) * S]
        res = evaluate_configs(self.eval_model(), self.data.val, self.data.mean, self.data.std,
                               configs, threshold=self.cfg.exit_threshold,
                               batch_size=self.cfg.eval_batch_size, channels_last=self.cfg.channels_last)
        return {"val_super": res[skip_to_str(configs[0])]["accuracy_per_exit"],
                "val_base": res[skip_to_str(configs[1])]["accuracy_per_exit"],
                "val_super_mean_exit": res[skip_to_str(configs[0])]["early_exit"]["mean_exit"]}

    def fit(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        if resume:
            self.resume()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.ctx.is_main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model {cfg.model} ({n_params / 1e6:.2f} M params, {self.model.num_stages} exits) "
                 f"on {self.data.name} {self.data.img_size}px: {len(self.data.train)} train / "
                 f"{len(self.data.val)} val / {len(self.data.test)} test, {self.ctx.world_size} process(es), "
                 f"{'bf16 autocast' if self.bf16 else 'fp32'}")
        while self.epoch < cfg.epochs:
            # A run killed between its epoch's last step and the epoch's end resumes with nothing
            # left to train in that epoch: only the validation and bookkeeping remain.
            stats = self.train_epoch() if self.step_in_epoch < self.steps_per_epoch else {}
            stopped_early = bool(cfg.max_steps and self.global_step >= cfg.max_steps
                                 and self.step_in_epoch < self.steps_per_epoch)
            if not stopped_early:
                self.epoch += 1
                self.step_in_epoch = 0
            if self.ctx.is_main:
                record = {"epoch": self.epoch, "step": self.global_step, "world_size": self.ctx.world_size,
                          "lr": self.scheduler.get_last_lr()[0], **stats, **self.validate()}
                with open(self.out / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                trained = (f"loss {stats['loss']:.4f}  train acc {stats['train_acc']:.4f}  " if stats else "")
                timing = (f"  ({stats['epoch_seconds']:.0f} s, {stats['images_per_second']:.0f} img/s)"
                          if stats else "")
                self.log(f"epoch {self.epoch}: {trained}val super {record['val_super'][-1]:.4f}  "
                         f"val base {record['val_base'][-1]:.4f}{timing}")
            self.save()
            barrier(self.ctx)
            if stopped_early:
                break
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Evaluate every skip config and exit on the test split; write model.pt and eval.json."""
        if not self.ctx.is_main:
            return {}
        from runtime.atomic import atomic_write_json

        model = self.eval_model()
        results = evaluate_configs(model, self.data.test, self.data.mean, self.data.std,
                                   threshold=self.cfg.exit_threshold,
                                   batch_size=self.cfg.eval_batch_size, channels_last=self.cfg.channels_last)
        S = model.num_stages
        macs = {skip_to_str(s): macs_per_exit(model, s, self.input_size)
                for s in [tuple(bool(c == "T") for c in k) for k in results]}
        summary = {"model": self.cfg.model, "data": self.data.name, "epochs": self.epoch,
                   "steps": self.global_step, "test": results, "macs_per_exit": macs,
                   "full_depth_accuracy": results["F" * S]["accuracy_per_exit"][-1],
                   "base_accuracy": results["T" * S]["accuracy_per_exit"][-1]}
        final = self._state()
        final.update(optimizer=None, scheduler=None, eval=summary)
        save_checkpoint(final, self.out / FINAL_NAME)
        atomic_write_json(self.out / "eval.json", summary)
        try:
            from train.plots import plot_exit_accuracy
            plot_exit_accuracy(summary, self.out / "exits.png")
        except ImportError:  # matplotlib is optional
            pass
        return summary
