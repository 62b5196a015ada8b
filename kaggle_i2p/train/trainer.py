"""`kaggle-i2p train`: fine-tune a CLIP vision tower into a 384-d prompt-embedding regressor (the winners' recipe).

Stages run in order, each with a fresh AdamW over layer-wise-decayed groups and a warm-up + cosine schedule: e.g.
head-only linear probing, then full fine-tuning, then a higher resolution (position embeddings resampled once).
An EMA of the weights is what gets evaluated, kept and exported. `accelerate` runs it on one or many GPUs (DDP) or
the CPU, in fp16 with a grad scaler or bf16 autocast. Checkpoints land atomically in OUTPUT/last.pt (every epoch,
and every `checkpoint_every` steps); rerunning the same command resumes the same run where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.ensemble import mean_cosine
from ..core.errors import I2PError
from ..core.fileio import atomic_open
from ..kinds.regressor import RegressorSpec
from ..models.towers import at_resolution, build_tower, check_architectures, load_initial_weights, tower_from_state
from .checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from .config import StageConfig, TrainConfig, TrainConfigError, config_changes, load_train_config
from .data import TrainImages, TrainingData, epoch_rows, load_training_data, loader, rank_batches
from .lora import (
    Adapters,
    adapter_problems,
    adapter_targets,
    add_adapters,
    block_range,
    merge_adapters,
    record,
    set_trainable,
    split_state,
)
from .recipe import (
    ModelEMA,
    cosine_embedding_loss,
    freeze_lowest,
    layer_ids,
    llrd_param_groups,
    make_optimizer,
    set_head_only,
    warmup_cosine,
)
from .text_map import TextMap, fit_text_map

log = logging.getLogger(__name__)
LAST, BEST, BEST_PREDICTIONS = "last.pt", "best.pt", "best_val_predictions.npz"
METRICS_JSONL, METRICS_CSV = "metrics.jsonl", "metrics.csv"


class TrainingError(I2PError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def write_checkpoint(state: dict, path: Path) -> None:
    """`torch.save` into a temporary file renamed over `path`: a failed write (a full disk) is one TrainingError
    naming the file, and the previous checkpoint there is kept whole."""
    try:
        with atomic_open(path, "wb") as handle:
            torch.save(state, handle)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as a RuntimeError
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        kept = "the previous checkpoint there is kept" if path.is_file() else "no checkpoint was left there"
        raise TrainingError(f"cannot write the checkpoint {path} ({getattr(err, 'strerror', None) or err}; "
                            f"{free / 1e6:.0f} MB free); {kept}: free some space and rerun the same command to "
                            "resume from the last checkpoint") from err


@dataclass
class Progress:
    """Where the run is: stages done, epochs done in the current stage, optimizer steps done in the current epoch."""

    stage: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_loss_sum: float = 0.0
    best_val: float = -math.inf
    best_at: str = ""


@dataclass(frozen=True)
class TrainResult:
    """A finished run: its folder, checkpoints and per-epoch history (validation cosine of the evaluated weights)."""

    output: Path
    last: Path
    best: Path
    best_val: float
    history: list[dict]
    main_process: bool = True  # False in the other processes of a multi-process run


def mixed_precision(precision: str, cuda: bool) -> str:
    """accelerate's mixed_precision for a config precision: auto = bf16 where the GPU has it (A100/H100), fp16 with a
    grad scaler elsewhere (T4, P100, V100), none on a CPU."""
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    return "no" if precision == "fp32" else precision


def check_stage_architectures(config: TrainConfig, embedding_dim: int = 384) -> None:
    """Run the tower on the meta device at every stage and serving resolution before any data or weights load;
    raises ManifestError naming a resolution the arch cannot run at."""
    spec = config.tower
    resolutions = sorted({s.resolution for s in config.stages} | set(spec.image.resolutions))
    probe = replace(spec, image=replace(spec.image, resolutions=tuple(resolutions)))
    check_architectures([probe], embedding_dim, source=config.path)


def check_stage_adapters(config: TrainConfig, embedding_dim: int = 384) -> None:
    """Every LoRA stage's block range lies within the tower's blocks and holds modules to adapt, checked on the meta
    device before any data or weights load (`lora.adapter_problems`); raises TrainConfigError naming the field."""
    stages = [(i, s.lora) for i, s in enumerate(config.stages) if s.lora is not None]
    if not stages:
        return
    with torch.device("meta"):
        tower = build_tower(config.tower, embedding_dim)
    problems = adapter_problems(tower, stages, config.tower.arch)
    if problems:
        raise TrainConfigError(config.path, problems)


def check_text_map(config: TrainConfig, embedding_dim: int = 384) -> None:
    """`head.init: text_map` needs a Linear head from the CLIP embedding width (the text tower's) to the targets';
    checked on the meta device before any weights load."""
    if config.text_map is None:
        return
    from ..bank.build import clip_text_width

    try:
        clip_dim = clip_text_width(config.text_map.clip_arch)
    except (ValueError, OSError, KeyError) as err:
        raise TrainConfigError(config.path, [f"text_map.clip_arch: {err}"]) from err
    with torch.device("meta"):
        head = build_tower(config.tower, embedding_dim).head
    if not isinstance(head, torch.nn.Linear) or head.in_features != clip_dim:
        width = head.in_features if isinstance(head, torch.nn.Linear) else "?"
        raise TrainConfigError(config.path, [
            f"tower.head.init: text_map maps {config.text_map.clip_arch}'s {clip_dim}-d text embeddings, but the "
            f"head takes {width}-d features: give the tower the CLIP's projected image embedding (the same CLIP)"])


class MetricsLog:
    """metrics.jsonl (every logged step and epoch) and metrics.csv (one row per epoch), written by the main process;
    a resumed run first drops the records of steps after its checkpoint."""

    def __init__(self, output: Path, enabled: bool, resume_step: int | None):
        self.jsonl, self.csv, self.enabled = output / METRICS_JSONL, output / METRICS_CSV, enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and self.jsonl.is_file():
            kept = [line for line in self._records() if json.loads(line)["global_step"] <= resume_step]
        self._guard(self.jsonl, lambda: self._rewrite(kept))

    def _records(self) -> list[str]:
        """The readable records of metrics.jsonl; a line cut by a kill (or otherwise damaged) is dropped, warned."""
        kept, dropped = [], 0
        for line in self.jsonl.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if line.strip() and isinstance(json.loads(line).get("global_step"), int):
                    kept.append(line)
                    continue
            except (ValueError, AttributeError):
                pass
            dropped += bool(line.strip())
        if dropped:
            log.warning("%s: %d damaged line(s) dropped (a run killed mid-write)", self.jsonl, dropped)
        return kept

    def _rewrite(self, lines: list[str]) -> None:
        with atomic_open(self.jsonl, "w") as handle:
            handle.write("".join(line + "\n" for line in lines))

    def _guard(self, path: Path, write) -> None:
        """Metrics are a log: a write that fails (a full disk) warns once, and training goes on."""
        if not self.enabled:
            return
        try:
            write()
        except OSError as err:
            self.enabled = False
            log.warning("cannot write %s (%s); training goes on without metrics files (checkpoints still hold "
                        "the history)", path, err.strerror or err)

    def write(self, record: dict) -> None:
        def append() -> None:
            with open(self.jsonl, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

        self._guard(self.jsonl, append)

    def write_epochs(self, history: list[dict]) -> None:
        if not history:
            return

        def rewrite() -> None:
            with atomic_open(self.csv, "w", encoding="utf-8") as handle:
                pd.DataFrame(history).to_csv(handle, index=False, lineterminator="\n")

        self._guard(self.csv, rewrite)


class Trainer:
    """One training run; `run()` trains every remaining stage and returns the result."""

    def __init__(self, config: TrainConfig, restart: bool = False, accelerator=None):
        try:
            from accelerate import Accelerator
        except ImportError as err:
            raise TrainingError("training needs accelerate (one GPU, many, or the CPU): pip install "
                                "'kaggle_i2p[train]'") from err

        self.config = config
        cuda = torch.cuda.is_available() and not config.cpu
        try:
            self.accelerator = accelerator or Accelerator(cpu=not cuda,
                                                          mixed_precision=mixed_precision(config.precision, cuda))
        except ValueError as err:  # accelerate fixes the precision and device once per process
            raise TrainingError(f"{err}\n  fix: run this training in a new process (kaggle-i2p train, or restart the "
                                "kernel); one Python process trains with one precision and device") from err
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.device = self.accelerator.device
        self.output = config.output
        self.data = load_training_data(config.work, config.data.val_fold, config.data.max_val_images)
        self.dim = int(self.data.targets.shape[1])
        self.stage_data = self._stage_datasets()
        check_stage_architectures(config, self.dim)
        check_stage_adapters(config, self.dim)
        check_text_map(config, self.dim)
        self.adapters: Adapters | None = None  # the current stage's LoRA adapters, while it runs
        self.spec: RegressorSpec = config.tower
        self.progress = Progress()
        self.history: list[dict] = []
        self._resume_state = None if restart else self._read_last()
        self.tower = self._initial_tower()
        text_map = self._text_map_head() if config.text_map is not None and self._resume_state is None else None
        self.ema = None
        if config.ema_decay > 0:
            self.ema = ModelEMA(self.tower, config.ema_decay, warmup=config.ema_warmup)
            if self._resume_state is not None:
                self.ema.module.load_state_dict(self._resume_state["ema"])
        self.metrics = MetricsLog(self.output, self.main, self.progress.global_step if self._resume_state else None)
        if text_map is not None:
            self.metrics.write({"type": "text_map", "global_step": 0, "prompts": text_map.prompts,
                                "val_cosine": round(text_map.val_cosine, 6), "val_images": text_map.val_prompts,
                                "ridge": config.text_map.ridge})

    def _text_map_head(self) -> TextMap:
        """`head.init: text_map`: the head's weight becomes the ridge map from the training prompts' CLIP text
        embeddings to their targets (bias zero), fitted once on the main process and given to the others."""
        config = self.config.text_map
        text_map = None
        if self.main:
            log.info("fitting the text-map head: %s text embeddings of the training prompts -> targets (ridge %g)",
                     config.clip_arch, config.ridge)
            text_map = fit_text_map(config, self.stage_data, self.data, str(self.device), self.config.seed)
            log.info("text-map head: fitted on %d prompts; text -> target cosine on the validation prompts %.4f",
                     text_map.prompts, text_map.val_cosine)
        weight = torch.zeros_like(self.tower.head.weight) if text_map is None else torch.from_numpy(text_map.weight)
        if self.world > 1:
            from accelerate.utils import broadcast

            weight = broadcast(weight.to(self.device), from_process=0).cpu()
        with torch.no_grad():
            self.tower.head.weight.copy_(weight)
            if self.tower.head.bias is not None:
                self.tower.head.bias.zero_()
        return text_map

    # --- set-up -----------------------------------------------------------------------------------------------
    def _read_last(self) -> dict | None:
        last = self.output / LAST
        if not last.is_file():
            return None
        state = read_checkpoint(last)
        changes = config_changes(state["config"], self.config.raw)
        if changes:
            raise TrainingError(f"{last} belongs to a run with another config:\n  " + "\n  ".join(changes)
                                + f"\n  fix: put the original config back, choose a new output folder, or pass "
                                  f"--restart to start over in {self.output}")
        if state["world_size"] != self.world:
            log.warning("resuming a %d-process run with %d processes: batches from here on are split differently",
                        state["world_size"], self.world)
        self.progress = Progress(**state["progress"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"])
        log.info("resuming %s: stage %d, epoch %d, step %d", last, self.progress.stage, self.progress.epoch,
                 self.progress.global_step)
        return state

    def _initial_tower(self):
        if self._resume_state is not None:
            self.spec = replace(self.spec, native_resolution=self._resume_state["tower"].get("native_resolution"))
            return tower_from_state(self.spec, self._resume_state["model"], self.dim)
        torch.manual_seed(self.config.seed)
        tower = build_tower(self.spec, self.dim)
        if self.config.init is not None:
            for note in load_initial_weights(tower, self.config.init):
                log.info("%s: %s", self.config.init, note)
        else:
            log.warning("tower.init is none: training from random weights")
        return tower

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def _checkpoint_state(self, optimizer=None, stage: int | None = None) -> dict:
        model, ema = _cpu_state(self.tower), _cpu_state(self.ema.module) if self.ema else None
        adapters = None
        if self.adapters is not None:  # a plain tower's keys (the frozen base) and the adapters beside them
            model, model_adapters = split_state(model)
            ema, ema_adapters = split_state(ema) if ema is not None else (None, None)
            adapters = {"stage": self.progress.stage, "layout": record(self.adapters), "model": model_adapters,
                        "ema": ema_adapters}
        state = {"format": CHECKPOINT_FORMAT, "config": self.config.raw, "tower": self.spec.to_dict(),
                 "embedding_dim": self.dim, "model": model, "ema": ema, "adapters": adapters,
                 "progress": asdict(self.progress), "history": self.history, "world_size": self.world,
                 "rng": torch.get_rng_state()}
        if optimizer is not None:
            scaler = self.accelerator.scaler
            state.update(optimizer=optimizer.state_dict(), optimizer_stage=stage,
                         scaler=scaler.state_dict() if scaler else None)
        return state

    def _save(self, name: str, optimizer=None, stage: int | None = None) -> None:
        """Write a checkpoint from the main process (atomically); `optimizer` belongs to stage index `stage`."""
        self.accelerator.wait_for_everyone()
        if self.main:
            write_checkpoint(self._checkpoint_state(optimizer, stage), self.output / name)
        self.accelerator.wait_for_everyone()

    # --- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, module: torch.nn.Module, resolution: int) -> tuple[np.ndarray, np.ndarray]:
        """(validation rows, unit predictions) of `module` at `resolution`: no augmentation, inference's
        preprocessing; the rows are split over the processes and gathered back in order."""
        from accelerate.utils import gather_object

        rows = self.data.val_rows[self.rank::self.world]
        size = self.config.data.eval_batch_size
        batches = [rows[i:i + size].tolist() for i in range(0, len(rows), size)]
        dataset = TrainImages(self.data, self.spec.image, resolution)
        was_training = module.training
        module.eval()
        kept_rows, outputs = [], []
        with torch.no_grad():
            images = loader(dataset, batches, self.config.data.num_workers, self.device.type == "cuda")
            for requested, (views, _, used) in zip(batches, images, strict=True):
                with self.accelerator.autocast():
                    out = module(views.to(self.device, non_blocking=True))
                out = torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()
                same = used.numpy() == np.asarray(requested)  # an unreadable image is left out, not replaced
                kept_rows.append(used.numpy()[same])
                outputs.append(out[same])
        module.train(was_training)
        gathered = gather_object([(np.concatenate(kept_rows), np.concatenate(outputs))])
        all_rows = np.concatenate([r for r, _ in gathered])
        order = np.argsort(all_rows, kind="stable")
        return all_rows[order], np.concatenate([o for _, o in gathered])[order]

    def _validate(self, record: dict, resolution: int) -> dict:
        rows, predictions = self.evaluate(self.ema.module if self.ema else self.tower, resolution)
        val, _ = mean_cosine(predictions, self.data.unit_targets(rows))
        record = {**record, "val_cosine": round(val, 6), "val_images": len(rows)}
        self.history.append(record)
        if val > self.progress.best_val:
            self.progress.best_val, self.progress.best_at = val, f"{record['stage']} epoch {record['epoch']}"
            self._save(BEST)
            if self.main:
                with atomic_open(self.output / BEST_PREDICTIONS, "wb") as handle:
                    np.savez(handle, ids=self.data.ids[rows], rows=rows, predictions=predictions)
        self.metrics.write({"type": "epoch", **record})
        self.metrics.write_epochs(self.history)
        if self.main:
            log.info("%s epoch %s: val cosine %.4f (best %.4f, %s)", record["stage"], record["epoch"], val,
                     self.progress.best_val, self.progress.best_at)
        return record

    # --- training ------------------------------------------------------------------------------------------------
    def _stage_datasets(self) -> list[TrainingData]:
        """Each stage's training set, read (and checked to fill an optimizer step) before any weights load: the
        run's `work` by default; a stage's own `work` folder and/or `sources` filter otherwise, without the
        validation prompts. Validation is always the run's `work` fold `val_fold`."""
        config, loaded = self.config, {}
        datasets, validation_prompts = [], None
        for stage in config.stages:
            key = (stage.work or config.work, stage.sources)
            if key not in loaded:
                own_folder = stage.work is not None and stage.work.resolve() != config.work.resolve()
                if not own_folder and not stage.sources:
                    loaded[key] = self.data
                else:
                    if own_folder and validation_prompts is None:
                        validation_prompts = set(self.data.prompts(self.data.val_rows))
                    loaded[key] = load_training_data(key[0], config.data.val_fold, sources=stage.sources,
                                                     validation_prompts=validation_prompts if own_folder else None)
                    if loaded[key].targets.shape[1] != self.dim:
                        raise TrainConfigError(config.path, [
                            f"stages ({stage.name}).work: {key[0]}'s targets are {loaded[key].targets.shape[1]}-d, "
                            f"the validation set's ({config.work}) {self.dim}-d; embed both with the same model"])
            datasets.append(loaded[key])
            self._steps_per_epoch(stage, loaded[key])
        return datasets

    def _steps_per_epoch(self, stage: StageConfig, data: TrainingData) -> int:
        per_step = stage.batch_size * self.world * stage.accumulation
        steps = data.n_train_prompts // per_step
        if steps == 0:
            raise TrainConfigError(self.config.path, [
                f"stages ({stage.name}): {data.n_train_prompts} training prompts do not fill one optimizer step "
                f"of batch_size x processes x accumulation = {per_step}; lower the batch size"])
        return steps

    def _add_adapters(self, stage: StageConfig, index: int, resuming: bool) -> None:
        """A LoRA stage: adapters on its block range (the same in the EMA), frozen below, trained above; a resumed
        stage takes its adapters' values from the checkpoint."""
        _, n_blocks = layer_ids(self.tower)
        first, last = block_range(stage.lora.blocks, n_blocks)
        seed = int(np.random.SeedSequence([self.config.seed, index]).generate_state(1)[0])
        self.adapters = Adapters(adapter_targets(self.tower, first, last, stage.lora.modules), stage.lora.rank,
                                 stage.lora.alpha, stage.lora.dropout, seed)
        add_adapters(self.tower, self.adapters)
        fresh = split_state(self.tower.state_dict())[1]
        saved = self._resume_state.get("adapters") if resuming else None
        if saved is not None:
            if set(saved["model"]) != set(fresh):
                raise TrainingError(f"{self.output / LAST}: its adapters are not the ones stage {stage.name} makes "
                                    f"(another peft version?); pass --restart to start over in {self.output}")
            self.tower.load_state_dict(saved["model"], strict=False)
        if self.ema is not None:
            add_adapters(self.ema.module, self.adapters)
            self.ema.module.load_state_dict(saved["ema"] if saved else fresh, strict=False)
            self.ema.module.requires_grad_(False).eval()
        trainable, total = set_trainable(self.tower, last)
        if self.main:
            log.info("stage %s: LoRA (rank %d) on blocks %d..%d (%d modules), frozen below, trained above: %.1f%% "
                     "of %d parameters train", stage.name, stage.lora.rank, first, last, len(self.adapters.targets),
                     100 * trainable / total, total)

    def _merge_adapters(self) -> None:
        """The end of a LoRA stage: the adapters merged into the weights (tower and EMA), a plain tower again."""
        merge_adapters(self.tower.backbone)
        if self.ema is not None:
            merge_adapters(self.ema.module.backbone)
        self.adapters = None

    def _prepare_stage(self, stage: StageConfig, optimizer_state: dict | None, index: int = 0):
        self.tower = at_resolution(self.tower, stage.resolution, self.dim)
        self.spec = self.tower.spec
        if self.ema is not None:
            self.ema.module = at_resolution(self.ema.module, stage.resolution, self.dim).eval()
        set_head_only(self.tower, stage.head_only)
        if stage.freeze_lowest and not stage.head_only:
            freeze_lowest(self.tower, stage.freeze_lowest)
        if stage.lora is not None:
            self._add_adapters(stage, index, optimizer_state is not None)
        self.tower.train()
        if stage.head_only:
            self.tower.backbone.eval()  # linear probing: frozen features, no dropout or batch statistics
        groups = llrd_param_groups(self.tower, stage.lr, stage.layer_decay, stage.weight_decay)
        optimizer = make_optimizer(groups, stage.optimizer, stage.lr, stage.betas)
        model, optimizer = self.accelerator.prepare(self.tower, optimizer)
        if self.ema is not None:
            self.ema.module.to(self.device)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
            if self.accelerator.scaler is not None and self._resume_state.get("scaler"):
                self.accelerator.scaler.load_state_dict(self._resume_state["scaler"])
        return model, optimizer

    def run(self) -> TrainResult:
        """Train every stage not yet done; resumable at any checkpoint."""
        config = self.config
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            log.info("training %s (%s %s) on %d process(es), %s, %s precision: %d training prompts, %d validation "
                     "images", self.spec.name, self.spec.library, self.spec.arch, self.world, self.device,
                     self.accelerator.mixed_precision, self.data.n_train_prompts, len(self.data.val_rows))
        if config.eval_at_start and not self.history:
            self.tower.to(self.device)
            if self.ema is not None:
                self.ema.module.to(self.device)
            self._validate({"stage": "start", "epoch": 0, "global_step": 0,
                            "resolution": config.stages[0].resolution}, config.stages[0].resolution)
        epochs_before = sum(s.epochs for s in config.stages[:self.progress.stage])
        for index in range(self.progress.stage, len(config.stages)):
            stage = config.stages[index]
            resuming = self._resume_state is not None and self._resume_state.get("optimizer_stage") == index
            model, optimizer = self._prepare_stage(stage, self._resume_state["optimizer"] if resuming else None,
                                                   index)
            if self.main and self.stage_data[index] is not self.data:
                log.info("stage %s trains on %d prompts of %s%s", stage.name, self.stage_data[index].n_train_prompts,
                         self.stage_data[index].work, f" (sources {', '.join(stage.sources)})" if stage.sources else "")
            for epoch in range(self.progress.epoch, stage.epochs):
                self._train_epoch(model, optimizer, stage, index, epoch, epochs_before + epoch)
            self.progress.stage, self.progress.epoch = index + 1, 0
            epochs_before += stage.epochs
            self.tower = self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            if stage.lora is not None:
                self._merge_adapters()
            self._save(LAST)  # between stages: the next stage starts a fresh optimizer
            self.accelerator.free_memory()
        self.accelerator.wait_for_everyone()
        return TrainResult(self.output, self.output / LAST, self.output / BEST, self.progress.best_val, self.history,
                           self.main)

    def _train_epoch(self, model, optimizer, stage: StageConfig, index: int, epoch: int, epoch_key: int) -> None:
        """Train one epoch (or what is left of it after a resume), then validate and checkpoint."""
        config, progress, data = self.config, self.progress, self.stage_data[index]
        steps = self._steps_per_epoch(stage, data)
        total, done_before = steps * stage.epochs, steps * epoch
        warmup = round(stage.warmup * total) if stage.warmup < 1 else int(stage.warmup)
        batches = rank_batches(epoch_rows(data, config.seed, epoch_key), stage.batch_size, self.world,
                               self.rank, stage.accumulation)[progress.step_in_epoch * stage.accumulation:]
        dataset = TrainImages(data, self.spec.image, stage.resolution, config.data, config.seed, epoch_key)
        images = loader(dataset, batches, config.data.num_workers, self.device.type == "cuda")
        bar = tqdm(total=steps, initial=progress.step_in_epoch, disable=not self.main, unit="step", dynamic_ncols=True,
                   desc=f"{stage.name} {epoch + 1}/{stage.epochs} @{stage.resolution}")
        started, step_loss = time.perf_counter(), torch.zeros((), device=self.device)
        images_seen = 0
        for micro, (views, targets, _) in enumerate(images):
            sync = (micro + 1) % stage.accumulation == 0
            with nullcontext() if sync else self.accelerator.no_sync(model):
                with self.accelerator.autocast():
                    predictions = model(views.to(self.device, non_blocking=True))
                loss = cosine_embedding_loss(predictions.float(), targets.to(self.device), config.loss.margin,
                                             config.loss.negative_weight, config.loss.mse_weight)
                self.accelerator.backward(loss / stage.accumulation)
            step_loss += loss.detach() / stage.accumulation
            images_seen += len(views)
            if not sync:
                continue
            scale = warmup_cosine(done_before + progress.step_in_epoch, total, warmup, stage.min_lr_scale)
            for group in optimizer.param_groups:
                group["lr"] = stage.lr * group["lr_scale"] * scale
            if stage.grad_clip > 0:
                self.accelerator.clip_grad_norm_(model.parameters(), stage.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if self.ema is not None and not optimizer.step_was_skipped:
                self.ema.update(self.tower, step=progress.global_step)
            mean_loss = float(self.accelerator.reduce(step_loss, "mean"))
            step_loss.zero_()
            progress.global_step += 1
            progress.step_in_epoch += 1
            progress.epoch_loss_sum += mean_loss
            lr = stage.lr * scale
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if progress.global_step % config.log_every == 0:
                self.metrics.write({"type": "step", "stage": stage.name, "epoch": epoch + 1,
                                    "global_step": progress.global_step, "loss": round(mean_loss, 6), "lr": lr})
            if config.checkpoint_every and progress.global_step % config.checkpoint_every == 0:
                self._save(LAST, optimizer, index)
        bar.close()
        seconds = time.perf_counter() - started
        record = {"stage": stage.name, "epoch": epoch + 1, "global_step": progress.global_step,
                  "resolution": stage.resolution, "train_loss": round(progress.epoch_loss_sum / steps, 6),
                  "lr_end": stage.lr * warmup_cosine(done_before + steps - 1, total, warmup, stage.min_lr_scale),
                  "seconds": round(seconds, 2),
                  "images_per_s": round(images_seen * self.world / seconds, 2) if images_seen else None}
        progress.epoch, progress.step_in_epoch, progress.epoch_loss_sum = epoch + 1, 0, 0.0
        self._validate(record, stage.resolution)
        self._save(LAST, optimizer, index)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def train(config: TrainConfig | str | Path, restart: bool = False, accelerator=None) -> TrainResult:
    """Run (or resume) the training a config describes; see the module docstring. `accelerator`: your own
    `accelerate.Accelerator` (e.g. with kwargs handlers) instead of the one the config's precision implies."""
    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    return Trainer(config, restart=restart, accelerator=accelerator).run()
