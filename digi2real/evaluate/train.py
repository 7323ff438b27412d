"""Train a face recogniser (IResNet + ArcFace/CosFace) on a converted dataset.

One process, or several under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on
CUDA). Rank 0 alone writes: ``CKPT_DIR/checkpoint.pt`` (everything needed to continue at
the exact step) every ``checkpoint_every`` steps, at each epoch end and when
``max_steps`` stops the run; ``train_config.json`` at the start; and the final
``backbone.safetensors`` for :mod:`digi2real.evaluate.verify`.

Resuming is exact: the sampler order and the flips depend only on (seed, epoch, index),
and the checkpoint carries model, head, optimizer, scheduler, scaler, BN statistics,
step and RNG states, so a run killed at any instant and restarted ends with the same
weights as an uninterrupted one (CPU, same thread count).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import platform
import random
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from digi2real.data import fsio
from digi2real.evaluate.backbones import get_backbone
from digi2real.evaluate.choices import BACKBONES, SCHEDULES
from digi2real.evaluate.data import DATA_FORMATS, open_dataset
from digi2real.evaluate.losses import DEFAULT_SCALE, LOSSES, MarginHead

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
BACKBONE_NAME = "backbone.safetensors"
CONFIG_NAME = "train_config.json"
CHECKPOINT_FORMAT = 1
# Fields that define the optimisation trajectory: resuming with any of them changed would
# silently train a different model, so it is refused.
RUN_DEFINING = (
    "backbone",
    "loss",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "milestones",
    "lr_gamma",
    "embedding_size",
    "scale",
    "margin",
    "easy_margin",
    "clip_grad_norm",
    "seed",
    "flip",
)


@dataclass
class TrainConfig:
    """Everything a training run depends on; ``batch_size`` is per process."""

    data: str
    out: str
    backbone: str = "iresnet50"
    loss: str = "arcface"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "poly"
    warmup_epochs: float = 0.0
    milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    embedding_size: int = 512
    scale: float = DEFAULT_SCALE
    margin: float | None = None
    easy_margin: bool = False
    clip_grad_norm: float = 5.0
    flip: bool = True
    amp: bool = False
    resume: bool = False
    seed: int = 0
    num_workers: int = 2
    checkpoint_every: int = 1000
    max_steps: int | None = None
    threads: int | None = None
    data_format: str = "auto"
    device: str = "auto"
    deterministic: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.data, self.out = str(self.data), str(self.out)
        self.milestones = tuple(int(m) for m in self.milestones)
        choices = {
            "backbone": BACKBONES,
            "loss": LOSSES,
            "schedule": SCHEDULES,
            "data_format": DATA_FORMATS,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {list(valid)}")
        positive = ("epochs", "batch_size", "checkpoint_every", "embedding_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be increasing epochs, got {self.milestones}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["milestones"] = list(self.milestones)
        return data


@dataclass
class LRSchedule:
    """Multiplier of the base LR for global step ``s`` (0-based), used by LambdaLR.

    ``poly``: arcface_torch's PolyScheduler, linear warmup then (1 - progress)^2.
    ``step``: multiply by ``gamma`` at each milestone epoch (AdaFace/DCFace style).
    """

    kind: str
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "poly":
            span = max(self.total_steps - self.warmup_steps, 1)
            return max(1.0 - (step - self.warmup_steps) / span, 0.0) ** 2
        if self.kind == "step":
            epoch = step // self.steps_per_epoch
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        return 1.0


class SkipSampler(Sampler[int]):
    """The first ``skip`` indices of ``sampler`` dropped: the batches a resumed run has done."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        iterator = iter(self.sampler)
        for _ in range(self.skip):
            next(iterator)
        yield from iterator

    def __len__(self) -> int:
        return len(self.sampler) - self.skip  # type: ignore[arg-type]


class TrainModule(nn.Module):
    """Backbone and margin head as one module so DDP all-reduces the class centres too."""

    def __init__(self, backbone: nn.Module, head: MarginHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images), labels)


@dataclass
class TrainResult:
    step: int
    epoch: int
    finished: bool
    checkpoint: Path
    backbone: Path | None


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # numpy's array goes in as a tensor so the checkpoint loads with weights_only=True.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save published atomically: a kill mid-write leaves the previous checkpoint."""
    # streamed into the temp file rather than a BytesIO: a head with 1M classes is GBs
    with fsio.atomic_open(path) as handle:
        torch.save(obj, handle)


# what a digi2real checkpoint holds besides its format, and of which type
CHECKPOINT_FIELDS: dict[str, type] = {
    "config": dict,
    "world_size": int,
    "num_classes": int,
    "epoch": int,
    "step": int,
    "step_in_epoch": int,
    "backbone": dict,
    "head": dict,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "rng": dict,
}
# torch's weights-only unpickler names the global a file asks for: a function or class that
# a plain tensor checkpoint never holds (os.system, builtins.eval, a pickled object...)
_UNSAFE_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)|unrecognized function (\S+)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, loaded without unpickling arbitrary objects
    (``weights_only=True``): a file that asks for any (a pickle that would run code when
    loaded) is refused as such; a corrupt, truncated or foreign one, or one whose fields are
    missing or of the wrong type, is one ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a raw pickle's protocol: the refusal below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _UNSAFE_GLOBAL.search(str(error))
        wanted = (unsafe.group(1) or unsafe.group(2)) if unsafe else _pickled_global(path)
        if wanted:
            raise ValueError(
                f"refusing to unpickle {path}: it asks for {wanted}, so it is not a "
                "plain tensor checkpoint (loading it could run code); use a checkpoint.pt "
                "written by `digi2real evaluate train`"
            ) from None
        raise ValueError(f"{path} is not a torch checkpoint (damaged pickle data)") from None
    except OSError:
        raise
    except Exception as error:  # a damaged archive fails anywhere in torch's reader
        raise ValueError(
            f"{path} is not a readable torch checkpoint (corrupt or truncated: {brief(error)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a digi2real evaluate checkpoint")
    wrong = [
        name
        for name, kind in CHECKPOINT_FIELDS.items()
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool)
    ]
    if wrong:
        raise ValueError(
            f"{path} is a damaged digi2real evaluate checkpoint: {', '.join(wrong)} missing or "
            "of the wrong type"
        )
    config, weights = state["config"], state["backbone"]
    fc = weights.get("fc.weight")
    if (
        config.get("backbone") not in BACKBONES
        or not isinstance(fc, torch.Tensor)
        or fc.ndim != 2
        or config.get("embedding_size") != fc.shape[0]
    ):
        raise ValueError(
            f"{path} is a damaged digi2real evaluate checkpoint: its config's backbone "
            f"{config.get('backbone')!r:.40} and embedding_size "
            f"{config.get('embedding_size')!r:.40} do not describe its weights"
        )
    return state


def _pickled_global(path: Path) -> str | None:
    """The first global (``module.name``) a raw pickle file asks for, or None; read with
    :mod:`pickletools`, which runs nothing (torch refuses a protocol-4 pickle before it reads
    as far as its STACK_GLOBAL, so its own message does not say)."""
    import pickletools

    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
            for opcode, arg, _ in pickletools.genops(handle):
                if opcode.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if opcode.name == "STACK_GLOBAL":
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle at all: random bytes, a damaged archive
        return None
    return None


def checkpoint_backbone(state: dict[str, Any], path: Path) -> nn.Module:
    """The backbone a checkpoint from :func:`load_checkpoint` holds, with its weights."""
    config = state["config"]
    try:
        module = get_backbone(config["backbone"], config["embedding_size"])
        module.load_state_dict(state["backbone"])
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"{path}: its backbone weights do not fit a {config['backbone']}: {brief(error)}"
        ) from None
    return module


def brief(error: BaseException, limit: int = 200) -> str:
    """A library's message on one line, cut to ``limit`` characters (torch's state-dict
    errors list every key, on many lines)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_resume(config: TrainConfig, saved: dict[str, Any], world_size: int, path: Path) -> None:
    current = config.to_dict()
    changed = [
        f"{key}: {saved['config'].get(key)!r} -> {current[key]!r}"
        for key in RUN_DEFINING
        if saved["config"].get(key) != current[key]
    ]
    if saved["world_size"] != world_size:
        changed.append(f"world_size: {saved['world_size']} -> {world_size}")
    if changed:
        raise ValueError(
            f"cannot resume {path}: the run was started with other settings ({'; '.join(changed)});"
            " use a new --out folder"
        )


def _write_backbone(backbone: nn.Module, config: TrainConfig, path: Path) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    metadata = {"backbone": config.backbone, "embedding_size": str(config.embedding_size)}
    fsio.atomic_write_bytes(path, save(tensors, metadata=metadata))


def _write_config(config: TrainConfig, path: Path, environment: dict[str, Any]) -> None:
    payload = {"config": config.to_dict(), "environment": environment}
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    fsio.atomic_write_bytes(path, text.encode("utf-8"))


def train(config: TrainConfig) -> TrainResult:
    """Run (or continue) the training described by ``config``; see the module docstring."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(config, local_rank)
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(config, device, rank, world_size)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, device: torch.device, rank: int, world_size: int) -> TrainResult:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_NAME
    if config.resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"--resume given but there is no {checkpoint_path}")
    # read and checked before anything is written: a checkpoint refused leaves CKPT_DIR as it was
    state = load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None
    if state is not None:
        _check_resume(config, state, world_size, checkpoint_path)
    if rank == 0:
        fsio.make_dirs(out)
        # a run killed mid-write leaves its temporary files; the committed ones are intact,
        # and rank 0 is the only writer in CKPT_DIR
        fsio.remove_stale_temps(out)

    dataset = open_dataset(config.data, config.data_format, seed=config.seed, flip=config.flip)
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size {config.batch_size} x {world_size} process(es) exceeds the "
            f"{len(dataset)} training images"
        )
    total_steps = steps_per_epoch * config.epochs

    backbone = get_backbone(config.backbone, config.embedding_size)
    head = MarginHead(
        config.embedding_size,
        dataset.num_classes,
        config.loss,
        scale=config.scale,
        margin=config.margin,
        easy_margin=config.easy_margin,
    )
    model = TrainModule(backbone, head).to(device)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    schedule = LRSchedule(
        config.schedule,
        total_steps,
        int(config.warmup_epochs * steps_per_epoch),
        steps_per_epoch,
        config.milestones,
        config.lr_gamma,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    use_scaler = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", growth_interval=100, enabled=use_scaler)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    step, epoch, step_in_epoch = 0, 0, 0
    if state is not None:
        try:
            model.backbone.load_state_dict(state["backbone"])
            model.head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as error:
            raise ValueError(
                f"cannot resume from {checkpoint_path}: its saved state does not fit this run "
                f"({brief(error)})"
            ) from None
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        logger.info("resuming %s at epoch %d, step %d", checkpoint_path, epoch, step)

    environment = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device.type,
        "world_size": world_size,
        "amp_dtype": str(amp_dtype).removeprefix("torch.") if config.amp else "float32",
        "num_classes": dataset.num_classes,
        "num_images": len(dataset),
        "steps_per_epoch": steps_per_epoch,
    }
    if rank == 0:
        _write_config(config, out / CONFIG_NAME, environment)
    logger.info(
        "training %s/%s on %d images, %d classes: %d steps/epoch x %d epochs, %d process(es)",
        config.backbone,
        config.loss,
        len(dataset),
        dataset.num_classes,
        steps_per_epoch,
        config.epochs,
        world_size,
    )

    ddp: nn.Module = model
    if world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    def save() -> None:
        if rank != 0:
            return
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "config": config.to_dict(),
                "world_size": world_size,
                "num_classes": dataset.num_classes,
                "epoch": epoch,
                "step": step,
                "step_in_epoch": step_in_epoch,
                "backbone": model.backbone.state_dict(),
                "head": model.head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
            },
            checkpoint_path,
        )

    progress = None
    if rank == 0 and config.progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    images_per_step = config.batch_size * world_size
    model.train()
    stopped = False
    try:
        while epoch < config.epochs and not stopped:
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            loader = DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=SkipSampler(sampler, step_in_epoch * config.batch_size),
                num_workers=config.num_workers,
                drop_last=True,
                pin_memory=device.type == "cuda",
            )
            tick = time.perf_counter()
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=config.amp):
                    loss = ddp(images, labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.clip_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.backbone.parameters(), config.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                step_in_epoch += 1
                if progress is not None:
                    now = time.perf_counter()
                    rate = images_per_step / max(now - tick, 1e-9)
                    tick = now
                    progress.set_postfix(
                        epoch=epoch, loss=f"{loss.item():.3f}", img_s=f"{rate:.1f}", refresh=False
                    )
                    progress.update(1)
                if step_in_epoch == steps_per_epoch:
                    break
                if step % config.checkpoint_every == 0:
                    save()
                if config.max_steps is not None and step >= config.max_steps:
                    stopped = True
                    break
            if step_in_epoch == steps_per_epoch:
                epoch += 1
                step_in_epoch = 0
                save()
                stopped = stopped or (config.max_steps is not None and step >= config.max_steps)
            elif stopped:
                save()
    finally:
        if progress is not None:
            progress.close()

    finished = epoch >= config.epochs
    backbone_path = None
    if finished and rank == 0:
        backbone_path = out / BACKBONE_NAME
        _write_backbone(model.backbone, config, backbone_path)
        logger.info("finished: %s", backbone_path)
    return TrainResult(step, epoch, finished, checkpoint_path, backbone_path)
