"""The FiRe-MPO trainer: one loss path, named steps, data-parallel, exactly resumable.

    load     model + processor (or the ones given), LoRA on the language model (or full
             fine-tuning with a frozen copy as reference), checkpointing, DDP wrapping
    data     dataset, a scan that drops (and counts) unusable examples, the epoch orders
    encode   the global batch of a step → this process's micro-batches (collated, padded)
    forward  reference then policy hidden states of all sequences in ONE backbone call each
             (4B sequences: (v,y+), (v,y−), (v',y+), (v',y−)); no logits anywhere. With
             ``shared_prefix`` (the default) y+ and y− continue one packed pass over image and
             prompt per example and image (``fgpo.models.prefix``), and under LoRA the vision
             features of each image serve both models; the hidden states come back in the
             plain layout, so the loss is unchanged
    loss     ``fgpo_kernels.FiReMPOLoss`` on the hidden states and the LM-head weight
    step     gradient accumulation, clipping, AdamW, the schedule
    log      ``metrics.jsonl`` (+ TensorBoard), the progress bar, checkpoints

Normalization: every micro-batch's summed loss is divided by the global batch size (times the
world size that DDP averages over), so k micro-batches on n processes give exactly the update
of the whole global batch at once.

Data order: epoch ``e`` visits the usable examples in ``randperm(seed + e)``; step ``s`` takes
the ``s``-th slice of ``global_batch_size`` and process ``r`` the items ``r::world`` of it. The
position is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import models as M
from ..data import PreferenceCollator, PreferenceDataset
from ..data.files import sha256_file
from . import checkpoint as ckpt
from .config import TrainConfig
from .guard import Boundary, check_finite, finish_row, hold_sigint, save_on_failure
from .logs import MetricsLog
from .objectives import SFT, build_loss, split_sequences
from .rundir import prepare_output_dir
from .state import resume_trainer, save_trainer
from .steps import StepMetrics, lr_lambda

_MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
_log = logging.getLogger(__name__)


class _Policy(nn.Module):
    """What DDP wraps: backbone hidden states and the head weight, nothing else."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return M.backbone_hidden_states(self.model, **inputs), M.lm_head_weight(self.model)


class Trainer:
    """Train a vision-language model with FiRe-MPO (or a preset) from a ``TrainConfig``.

    Args:
        cfg: the configuration.
        model, processor: an in-memory model and its ``fgpo.models.VLProcessor`` (both or
            neither); otherwise ``cfg.model`` is loaded.
        reference: for full fine-tuning, an explicit frozen reference model (default: a frozen
            copy of ``model`` taken before training).
        eval_fn: ``eval_fn(model) -> {name: number}``, called (on the main process, model in
            eval mode, no grad) every ``cfg.eval_steps`` steps and after the last one; logged as
            ``eval/<name>`` in the step's metrics row.

    ``train()`` runs to ``cfg.max_steps`` (or the epochs) and returns a summary dict.
    Under ``torchrun`` it initializes the process group itself (gloo on CPU, nccl on GPU).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module | None = None,
        processor: Any = None,
        reference: nn.Module | None = None,
        eval_fn: Any = None,
    ) -> None:
        if (model is None) != (processor is None):
            raise ValueError("pass both model and processor, or neither")
        if processor is not None and not hasattr(processor, "encode_prompt"):
            raise TypeError(
                f"processor must be a fgpo.models.VLProcessor, got {type(processor).__name__}; "
                "build one with fgpo.models.processor_for_config(model.config, tokenizer, "
                "image_processor)"
            )
        self.cfg = cfg
        if cfg.cpu_threads:
            torch.set_num_threads(int(cfg.cpu_threads))
        self._init_distributed()
        self._given = (model, processor, reference)
        self.eval_fn = eval_fn
        self.sft = cfg.preset_key == SFT
        self.model: nn.Module | None = None
        self.summary: dict[str, Any] = {}
        self.boundary: Boundary | None = None  # the state after the last completed update
        self.updating = False  # inside the update: the state is not consistent
        self.pending: dict[str, Any] | None = None  # an unlogged row read from a checkpoint
        self._due = (False, False)  # (eval, log) of the step being run, for its boundary

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "device is 'cuda' but no CUDA device is available (torch.cuda.is_available() "
                "is False); set device: cpu or auto"
            )
        cuda = torch.cuda.is_available() and self.cfg.device in ("auto", "cuda")
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def load(self) -> None:
        """Model, reference, LoRA / freezing, checkpointing, DDP, optimizer, schedule, loss."""
        cfg = self.cfg
        model, processor, reference = self._given
        if model is None:
            from ..models import tiny

            if tiny.is_tiny_name(cfg.model):
                if self.is_main:
                    tiny.ensure_tiny_model(cfg.model)
                self._barrier()
            # Unset with the prefix shared: sdpa, which takes the packed mask (flash-attn 2 cannot).
            attn = cfg.attn_implementation or (
                "sdpa" if cfg.shared_prefix and not self.sft else None
            )
            model, processor = M.load_model(cfg.model, cfg.dtype, attn)
        M.check_logit_transforms(model)  # before any work: a clear refusal, not another loss
        model.to(self.device)
        self.processor = processor
        self.reference = None  # LoRA: the same model with its adapters disabled; SFT: none
        # Seeded right before the random initialisation, never earlier: what ran before
        # (building the tiny model into an empty cache, loading) must not change it; and so
        # LoRA starts identical on every process.
        torch.manual_seed(cfg.seed)
        if cfg.lora:
            model = M.apply_lora(model, cfg)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
            if not cfg.train_vision:
                M.freeze_vision(model)
            if not self.sft:
                self.reference = reference if reference is not None else M.frozen_reference(model)
                self.reference.to(self.device).eval()
        if cfg.gradient_checkpointing:
            M.enable_gradient_checkpointing(model)
        model.train()
        self.model = model
        policy = _Policy(model)
        self.fsdp = self.world > 1 and not cfg.lora and cfg.fsdp
        self.ref_policy = _Policy(self.reference) if self.reference is not None else None
        if self.fsdp:
            self._shard(policy)
            self._shard(self.ref_policy)
        elif self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            policy = nn.parallel.DistributedDataParallel(policy, device_ids=ids)
        self.policy = policy
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("no trainable parameters (LoRA found no target layers?)")
        decay = [p for n, p in self.trainable.items() if p.ndim >= 2]
        no_decay = [p for n, p in self.trainable.items() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
        )
        self.loss_fn = build_loss(cfg.preset_key, cfg.loss_kwargs())
        self.prefix = self._plan_prefix()

    def _plan_prefix(self) -> M.prefix.PrefixPlan:
        """Shared-prefix or plain forward, and shared or per-pass vision; logged at start-up with
        the reason for any fallback."""
        ref = "none" if self.sft else ("copy" if self.ref_policy is not None else "adapters")
        inner, lm = M.backbone(self.model), M.language_model(self.model)
        plan = M.prefix.plan_shared_prefix(
            inner, lm, requested=self.cfg.shared_prefix, reference=ref
        )
        if self.is_main:
            _log.info("%s", plan.describe())
        return plan

    def _shard(self, policy: nn.Module) -> None:
        """FSDP2: each decoder layer is a unit, the rest (embeddings, vision, head) the root."""
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(M.language_model(policy.model), "layers", []):
            fully_shard(layer)
        fully_shard(policy)

    def load_data(self) -> None:
        """Dataset, the scan for unusable examples, and the step plan."""
        cfg = self.cfg
        self.train_file = cfg.train_file
        if cfg.generate_tiny_data:
            from ..pairs.synthetic import ensure_preference_set

            if self.is_main:
                ensure_preference_set(cfg.generate_tiny_data, cfg.seed)
            self._barrier()
            self.train_file = ensure_preference_set(cfg.generate_tiny_data, cfg.seed)
        if not self.train_file or not os.path.isfile(self.train_file):
            raise FileNotFoundError(
                f"train_file {self.train_file!r} does not exist (set train_file, or "
                "generate_tiny_data > 0 for generated records)"
            )
        self.data_sha256 = sha256_file(self.train_file)  # recorded in every checkpoint
        self.needs_corrupt = cfg.needs_corrupt()
        self.mask_key = "span_mask" if cfg.resolved_mask() == "span" else "response_mask"
        self.kl_key = {None: None, "span": "span_mask", "response": "response_mask"}[
            cfg.resolved_kl_mask()
        ]
        self.dataset = PreferenceDataset(
            self.train_file,
            self.processor,
            image_root=cfg.image_root,
            max_length=cfg.max_length,
            with_corrupt=self.needs_corrupt,
            mask=cfg.resolved_mask(),
            on_bad_tags=cfg.on_bad_tags,
            cache=cfg.cache_examples,
        )
        self.collator = PreferenceCollator(
            self.processor.pad_token_id, self.needs_corrupt, with_rejected=not self.sft
        )
        self.valid = self._scan()
        g = cfg.global_batch_size
        if g % (self.world * cfg.micro_batch_size):
            raise ValueError(
                f"global_batch_size={g} must be a multiple of micro_batch_size "
                f"({cfg.micro_batch_size}) x processes ({self.world})"
            )
        if len(self.valid) < g:
            raise ValueError(
                f"only {len(self.valid)} usable examples (skipped: {dict(self.skipped)}) for a "
                f"global batch of {g}"
            )
        self.steps_per_epoch = len(self.valid) // g  # full batches only: every step is exact
        self.total_steps = (
            cfg.max_steps if cfg.max_steps is not None else cfg.num_epochs * self.steps_per_epoch
        )
        self.accum = g // (self.world * cfg.micro_batch_size)
        warmup = round(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, self.total_steps, warmup)
        )
        self._orders: dict[int, list[int]] = {}

    def _scan(self) -> list[int]:
        """Encode every example once (sharded over processes); drop and count the unusable."""
        n = len(self.dataset)
        ok = torch.zeros(n, dtype=torch.int64)
        for k in range(self.rank, n, self.world):
            ok[k] = int(self.dataset[k] is not None)
        counts = Counter(self.dataset.skipped)  # by the dataset's reasons, whatever they are
        if self.world > 1:
            dist.all_reduce(ok)
            # What the dataset found when it was built (tags, image tokens in the text), every
            # process found: count it once; the encoding skips are this process's share.
            mine = counts - self.dataset.checked_skips
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, dict(mine))
            counts = sum((Counter(g) for g in gathered), Counter(self.dataset.checked_skips))
        self.skipped = {r: int(c) for r, c in sorted(counts.items()) if c}
        return [k for k in range(n) if ok[k]]

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.cfg.seed + epoch)
            perm = torch.randperm(len(self.valid), generator=gen).tolist()
            self._orders = {epoch: [self.valid[i] for i in perm]}
        return self._orders[epoch]

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------
    def encode(self, step: int) -> list[dict[str, Any]]:
        """This process's collated micro-batches of global step ``step``."""
        g, mb = self.cfg.global_batch_size, self.cfg.micro_batch_size
        epoch, j = divmod(step, self.steps_per_epoch)
        batch = self._order(epoch)[j * g : (j + 1) * g][self.rank :: self.world]
        out = []
        for i in range(0, len(batch), mb):
            items = [self.dataset[k] for k in batch[i : i + mb]]
            if any(it is None for it in items):  # only when images change after the scan
                raise RuntimeError(
                    f"examples {batch[i : i + mb]} became unusable during training "
                    f"(skipped: {dict(self.dataset.skipped)})"
                )
            out.append(self.collator(items))
        return out

    def _dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def _model_inputs(self, b: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = {k: b[k].to(self.device, non_blocking=True) for k in _MODEL_KEYS if k in b}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype())
        inputs.update(self.processor.extra_model_inputs(inputs["input_ids"]))
        return inputs

    def forward(self, b: dict[str, Any]):
        """Reference and policy hidden states of all ``n_seq * B`` sequences (plain layout,
        ``(n_seq * B, L, D)``, whichever path ran them), and the weights."""
        if self.prefix.enabled:
            inner = M.backbone(self.model)
            inputs, pk = self.prefix.model_inputs(
                b, inner, self.processor, self._dtype(), self.device
            )
            unpack = pk.unpack
        else:
            inputs, unpack = self._model_inputs(b), None
        h_ref = w_ref = None
        if self.sft:  # no reference: the objective is the policy's likelihood alone
            pass
        elif self.ref_policy is not None:  # full fine-tuning: the frozen copy (maybe sharded)
            with torch.no_grad():
                h_ref, w_ref = self.ref_policy(**inputs)
        else:  # LoRA: the same model with its adapters disabled
            with M.reference_context(self.model) as ref:
                h_ref = M.backbone_hidden_states(ref, **inputs)
        h, w = self.policy(**inputs)
        if unpack is not None:
            h, h_ref = unpack(h), (None if h_ref is None else unpack(h_ref))
        return h, h_ref, w, w_ref

    def compute_loss(self, b: dict[str, Any], h, h_ref, w, w_ref):
        """The objective (summed over the micro-batch) on the hidden states of each group:
        ``FiReMPOLoss`` for the preference presets, :class:`~.objectives.SFTLoss` for ``sft``."""
        seqs = split_sequences(b, h, h_ref, self.mask_key, self.device, self.kl_key)
        if self.sft:
            return self.loss_fn(w, seqs[0])
        corrupt = seqs[2:] if b["n_seq"] == 4 else [None, None]
        return self.loss_fn(
            w,
            seqs[0],
            seqs[1],
            *corrupt,
            has_corrupt=b["has_corrupt"].to(self.device),
            ref_weight=w_ref,
        )

    def train_step(self, step: int, micro: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One optimizer step over the global batch; returns the step's metrics row.

        ``micro`` are the step's micro-batches when already encoded (prefetched).
        """
        t0 = time.perf_counter()
        micro = self.encode(step) if micro is None else micro
        scale = self.world / self.cfg.global_batch_size  # DDP averages over the world
        metrics = StepMetrics()
        for k, b in enumerate(micro):
            sync = k == len(micro) - 1 or self.world == 1
            if self.fsdp:
                self.policy.set_requires_gradient_sync(sync)
                ctx = contextlib.nullcontext()
            else:
                ctx = contextlib.nullcontext() if sync else self.policy.no_sync()
            with ctx:
                h, h_ref, w, w_ref = self.forward(b)
                out = self.compute_loss(b, h, h_ref, w, w_ref)
                (out.loss * scale).backward()
            metrics.add(b, out)
        metrics.all_reduce(self.world)
        params = list(self.trainable.values())
        if self.cfg.max_grad_norm > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        lr = self.scheduler.get_last_lr()[0]
        row: dict[str, Any] = {"step": step + 1, "epoch": step / self.steps_per_epoch}
        row.update(metrics.means(), lr=lr, grad_norm=gnorm, tokens=metrics.tokens)
        check_finite(step, row)  # a NaN/inf loss stops here, before it reaches the weights
        row["time_s"] = time.perf_counter() - t0
        self._apply_update(step, row)
        return row

    def _apply_update(self, step: int, row: dict[str, Any]) -> None:
        """Optimizer, schedule and the new step boundary (with the step's row) as one unit:
        Ctrl-C is held until all are done, so a checkpoint never pairs updated weights with the
        previous step's number or RNG, nor loses the step's row (``guard.py``)."""
        with hold_sigint():
            self.updating = True
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.boundary = Boundary(step + 1, ckpt.rng_state(), row, *self._due)
            self.updating = False

    # ------------------------------------------------------------------------------------------
    # checkpoints (the file format and the state's gathering live in checkpoint.py)
    # ------------------------------------------------------------------------------------------
    def save(self, step: int) -> str:
        """Checkpoint the state after ``step`` optimizer steps (collective under torchrun),
        with the RNG states of that step boundary."""
        b = self.boundary
        return save_trainer(self, step, b.rng if b is not None and b.step == step else None)

    def resume(self, path: str | None = None, **kw: Any) -> int:
        """Restore the latest (or the given) checkpoint; returns its step (0 if none).
        ``kw``: ``fallback``, ``allow_config_change`` (see ``state.resume_trainer``)."""
        return resume_trainer(self, path, **kw)

    @property
    def run_name(self) -> str:
        return self.cfg.run_name or os.path.basename(os.path.normpath(self.cfg.output_dir))

    def evaluate(self) -> dict[str, float]:
        """``eval_fn(model)`` on the main process (eval mode, no grad), as ``eval/<name>``.

        The RNG states are put back afterwards, so evaluating never changes training (resume
        stays exact whether or not a run evaluates)."""
        out: dict[str, float] = {}
        if self.is_main and self.eval_fn is not None:
            rng = ckpt.rng_state()
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    got = self.eval_fn(self.model)
            finally:
                self.model.train(was_training)
                ckpt.set_rng_state(rng)
            out = {f"eval/{k}": float(v) for k, v in got.items()}
        self._barrier()
        return out

    # ------------------------------------------------------------------------------------------
    def train(
        self,
        resume: bool = False,
        stop_after: int | None = None,
        *,
        overwrite: bool = False,
        allow_config_change: bool = False,
        resume_fallback: bool = False,
    ) -> dict[str, Any]:
        """Run training; ``resume`` continues from the latest checkpoint in ``output_dir``.

        A directory holding another run is refused unless ``resume`` or ``overwrite`` (its files
        move to ``<output_dir>.old-<time>``). ``allow_config_change``: resume although the config
        changes the result; ``resume_fallback``: from the newest checkpoint that verifies.

        ``stop_after`` ends the run after that step (checkpointed) without changing the schedule
        (which ``max_steps`` defines): an interruption, for tests and time-limited jobs.
        """
        prepare_output_dir(
            self.cfg.output_dir, resume=resume, overwrite=overwrite, is_main=self.is_main,
            barrier=self._barrier,
        )  # fmt: skip
        if self.model is None:
            self.load()
            self.load_data()
        start = 0
        if resume:
            start = self.resume(fallback=resume_fallback, allow_config_change=allow_config_change)
        self.boundary = Boundary(start, ckpt.rng_state())
        log = MetricsLog(
            self.cfg.output_dir,
            resumed_step=start,
            enabled=self.is_main,
            tensorboard=self.cfg.tensorboard,
        )
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        bar = None
        if self.is_main and self.cfg.progress_bar and end > start:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=start, desc=self.run_name, dynamic_ncols=True)
        t0 = time.perf_counter()
        row: dict[str, Any] = {}
        every = self.cfg.save_steps
        last_saved = start if resume else -1
        # Encoding (image decode + preprocessing) of step s+1 overlaps the compute of step s;
        # it is a pure function of the step, so prefetching changes nothing else.
        pool = ThreadPoolExecutor(1) if self.cfg.prefetch and end > start else None
        nxt = pool.submit(self.encode, start) if pool is not None else None
        try:
            if self.pending is not None:  # the resumed step's row was not written: finish it
                row, due = self.pending["row"], self.pending["eval_due"]
                self.boundary = self.boundary._replace(row=row, eval_due=due, log_due=True)
                finish_row(self, log, row, due)
                self.pending = None
            for step in range(start, end):
                micro = nxt.result() if nxt is not None else None
                if pool is not None and step + 1 < end:
                    nxt = pool.submit(self.encode, step + 1)
                done = step + 1
                every_eval = self.cfg.eval_steps
                evaluate = bool(every_eval) and (done % every_eval == 0 or done == end)
                self._due = (evaluate, done % self.cfg.log_steps == 0 or done == end or evaluate)
                row = self.train_step(step, micro)
                self._due = (False, False)
                finish_row(self, log, row, evaluate)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=row.get("rewards/accuracies"))
                if every and done % every == 0:
                    self.save(done)
                    last_saved = done
            if end > start and last_saved != end:
                self.save(end)
        except BaseException:
            # Ctrl-C, a bad file met mid-run, a NaN loss: keep the completed steps, with the
            # RNG of the step boundary (never that of a step's start, never half an update).
            save_on_failure(self, last_saved)
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()
            log.close()
        self.summary = {
            "steps": end,
            "start_step": start,
            "total_steps": self.total_steps,
            "final_loss": row.get("loss"),
            "last_metrics": row,
            "usable_examples": len(self.valid),
            "skipped": self.skipped,
            "world_size": self.world,
            "time_s": time.perf_counter() - t0,
            "output_dir": self.cfg.output_dir,
            "checkpoint": ckpt.latest_checkpoint(self.cfg.output_dir),
        }
        return self.summary
