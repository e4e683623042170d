"""Typed training and data settings (jsonargparse turns them into --train.* / --data.* options)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Which token shards to train on.

    Args:
        corpus: a built-in corpus name (``prose``, ``mix``), prepared on first use, or the path of a
            directory written by ``mea prepare-data``.
        seq_len: tokens per training sequence (the model's context in training).
        eval_split: the held-out split the validation loss is measured on: ``val`` (reported results)
            or ``select`` (choosing settings: learning rates, initial scales), where the corpus has one.
    """

    corpus: str = "prose"
    seq_len: int = 128
    eval_split: str = "val"

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len: must be >= 1, got {self.seq_len}")
        if not str(self.corpus).strip():
            raise ValueError("data.corpus: empty; give a corpus name (prose, mix) or a prepared directory")


@dataclass
class TrainConfig:
    """Optimization settings.

    Args:
        max_steps: optimizer steps.
        batch_size: sequences per micro-batch per process.
        grad_accum: micro-batches per optimizer step (global batch = batch_size x grad_accum x world size).
        lr: peak learning rate.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        schedule: ``cosine`` (warmup then cosine), ``wsd`` (warmup, stable, linear decay), ``constant``.
        warmup_steps: linear warmup steps.
        decay_fraction: for ``wsd``, the fraction of steps in the final decay.
        weight_decay: decoupled weight decay of the matrices (AdamW).
        decay_mixing: also decay MEA/talking-heads mixing matrices (off: they start as identity).
        mixing_lr_mult: peak lr of the mixing matrices = lr x this; they are tiny and start at
            identity/replication, so at fine-tuning rates Adam barely moves them.
        freeze_mixing: leave the MEA/talking-heads mixing matrices as they start (not optimized): a
            mean-pooled conversion then heals as GQA, its mixing GQA's 0/1 replication.
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        eps: AdamW epsilon.
        grad_clip: max global gradient norm (0 disables).
        seed: seed of the initialization and of the data order.
        log_every: steps between metric records.
        eval_every: steps between validation losses (and at the end).
        eval_batches: validation batches per evaluation.
        save_every: steps between checkpoints (and at the end).
        keep_checkpoints: checkpoints kept on disk.
        diverge_loss: a training loss above this (or NaN/inf) stops the run as diverged;
            0 means 1.5 x ln(vocab), well above the loss of a fresh model.
        distill_temperature: with --distill_from, the temperature T both models' logits are divided
            by in the KL term (which is scaled by T^2, so its gradients keep their size).
        distill_alpha: with --distill_from, the weight of T^2 x KL(teacher || student) in the loss;
            the next-token loss has weight 1 - alpha.
    """

    max_steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    decay_mixing: bool = False
    mixing_lr_mult: float = 1.0
    freeze_mixing: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    diverge_loss: float = 0.0
    distill_temperature: float = 1.0
    distill_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"train.schedule: unknown schedule {self.schedule!r}; expected cosine, wsd or constant")
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches", "save_every",
                    "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr: must be positive, got {self.lr}")
        if not self.mixing_lr_mult > 0:  # also rejects NaN
            raise ValueError(f"train.mixing_lr_mult: must be positive, got {self.mixing_lr_mult}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"train.warmup_steps: {self.warmup_steps} is longer than the run "
                             f"(train.max_steps {self.max_steps}); the learning rate would never reach train.lr")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"train.decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if not self.distill_temperature > 0:
            raise ValueError(f"train.distill_temperature: must be positive, got {self.distill_temperature}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"train.distill_alpha: must be in [0, 1], got {self.distill_alpha}")
        if not self.diverge_loss >= 0:
            raise ValueError(f"train.diverge_loss: must be >= 0 (0: 1.5 ln(vocab)), got {self.diverge_loss}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        import math

        span = max(1, cfg.max_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))
    decay_steps = max(1, int(round(cfg.decay_fraction * cfg.max_steps)))
    decay_start = cfg.max_steps - decay_steps
    if step < decay_start:
        return peak
    t = min(1.0, (step - decay_start + 1) / decay_steps)
    return peak + (floor - peak) * t
