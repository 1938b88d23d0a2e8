"""The training loop: set up a run, resume it, step, evaluate, log, checkpoint, stop cleanly.

`train(config, workdir)` is what `gpt-jax train` calls. Restarting it on the same workdir
continues from the newest checkpoint; SIGTERM/SIGINT save a checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import data, evals, flops, run_status, sharding
from gpt_jax.evaluate import evaluate, open_split
from gpt_jax.metrics import MetricsWriter, Throughput
from gpt_jax.step import Trainer


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss or gradient (and the config says stop, not skip)."""


class StopSignal:
    """Turns SIGTERM/SIGINT into 'save and stop' at the next step boundary.

    Several processes must stop at the same step: there JAX's preemption sync point (fed by
    the coordination service's SIGTERM notifier) decides; one process decides alone.
    """

    def __init__(self):
        self.received = None
        self.stopped_at = None  # the step at which should_stop said yes
        self._previous = {}
        signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
        if self.received is not None:
            self.stopped_at = step
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def setup_tokenizer(config, workdir: str):
    """The run's tokenizer; a fine-tune inherits its parent's. Sets a byte/char vocab size
    in `config` (the run's own copy, see `resolve_run`)."""
    own = epath.Path(workdir, "tokenizer")
    if config.train.init_from and not own.exists() and jax.process_index() == 0:
        parent = epath.Path(config.train.init_from, "tokenizer")
        if parent.is_dir():
            own.mkdir(parents=True)
            for file in parent.iterdir():
                file.copy(own / file.name)
        else:
            ckpt_lib.restore_tokenizer_files(config.train.init_from, str(own))
    tokenizer = data.build_tokenizer(config, workdir)
    if tokenizer.kind in ("byte", "char") and not config.train.init_from:
        config.model.vocab_size = tokenizer.vocab_size  # a fine-tune keeps its parent's
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={config.model.vocab_size}")
    return tokenizer


def initial_state(trainer: Trainer, checkpointer, config):
    """(state, start_step): resumed from the workdir, else fine-tune params, else fresh."""
    restored = checkpointer.restore_latest(trainer.abstract_state())
    if restored is not None:
        state, meta = restored
        logging.info("resumed from %s at step %d", checkpointer.directory, meta["step"])
        return state, meta["step"]
    params = None
    if config.train.init_from:
        _, params = ckpt_lib.load_params(config.train.init_from,
                                         shardings=trainer.state_shardings["params"])
        logging.info("fine-tuning from the params of %s", config.train.init_from)
    return trainer.init_state(config.train.seed, params), 0


def describe_run(config, trainer: Trainer, workdir: str, n_params: int, log) -> None:
    mesh = trainer.mesh
    log(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.process_count()} process(es)); mesh {dict(mesh.shape)}")
    padded = flops.count_params(trainer.model_cfg)
    padding = (f" ({padded:,} with the vocabulary padded to "
               f"{trainer.model_cfg.padded_vocab_size})" if padded != n_params else "")
    log(f"model: {n_params:,} parameters{padding}; {config.model.n_layer} layers, width "
        f"{config.model.n_embd}, context {config.model.block_size}, vocab "
        f"{config.model.vocab_size}")
    log(f"tokens per step: {config.train.global_batch_size * config.model.block_size:,} "
        f"({config.train.global_batch_size} x {config.model.block_size}, "
        f"{config.train.microbatches} microbatch(es)); steps: {config.train.num_steps}")
    log(f"checkpoints: {ckpt_lib.checkpoint_dir(workdir)} (every {config.checkpoint.every}, "
        f"keep {config.checkpoint.keep}); metrics: {os.path.join(workdir, 'metrics.jsonl')}")


def inherit_parent(config) -> None:
    """A fine-tune takes its parent's architecture and tokenizer kind into `config` (the run's
    own copy, see `resolve_run`): the params must fit."""
    if not config.train.init_from:
        return
    parent = ckpt_lib.load_config(config.train.init_from)
    changed = [f for f in config_lib.PARENT_MODEL_FIELDS if config.model[f] != parent.model[f]]
    for field in changed:
        config.model[field] = parent.model[field]
    config.data.tokenizer = parent.data.tokenizer
    if changed:
        logging.warning("init_from=%s: model fields %s follow the parent run",
                        config.train.init_from, ", ".join(changed))


def resolve_run(config, workdir: str) -> tuple[ml_collections.FrozenConfigDict, Any]:
    """(the run's frozen config, its tokenizer); `config` itself is left as it was.

    A fine-tune takes its parent's architecture and tokenizer kind, a byte/char tokenizer sets
    the vocabulary; the config is validated once, before the tokenizer is built.
    """
    config = config.copy_and_resolve_references()
    inherit_parent(config)
    config_lib.validate(config, num_devices=jax.device_count())
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    tokenizer = setup_tokenizer(config, workdir)
    return ml_collections.FrozenConfigDict(config), tokenizer


def train(config, workdir: str) -> dict:
    """Train (or resume) the run in `workdir`; returns the last logged metrics."""
    stop = StopSignal()  # installed first: a SIGTERM during set-up still ends in a clean save
    run_status.write(workdir, "running")
    try:
        config, tokenizer = resolve_run(config, workdir)
        last = _train(config, tokenizer, workdir, stop)
    finally:
        stop.restore()
    run_status.ended(workdir, config.train.num_steps, stop.received, stop.stopped_at)
    return last


@dataclasses.dataclass
class Loop:
    """What the training loop steps through, evaluates with and writes to."""
    config: Any
    trainer: Trainer
    train_step: Callable
    eval_step: Callable
    loader: data.BatchLoader
    val_data: Any
    checkpointer: ckpt_lib.Checkpointer
    writer: MetricsWriter
    throughput: Throughput
    stop: StopSignal


def _train(config, tokenizer, workdir: str, stop: StopSignal) -> dict:
    ckpt_lib.check_resume_compatible(workdir, config)  # before config.json or any checkpoint
    if jax.process_index() == 0:
        epath.Path(workdir, "config.json").write_text(config_lib.to_json(config))

    mesh = sharding.make_mesh(config.mesh)
    trainer = Trainer.create(config, mesh)
    train_data = open_split(config, tokenizer, "train")
    val_data = open_split(config, tokenizer, "validation")
    checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint)
    t, seq_len = config.train, config.model.block_size
    with sharding.activate(mesh, trainer.rules):
        state, start_step = initial_state(trainer, checkpointer, config)
        train_step, eval_step = trainer.jit_train_step(), trainer.jit_eval_step()
        writer = MetricsWriter(workdir, t.num_steps, start_step)
        n_params = flops.count_params(trainer.model_cfg, padding=False)
        describe_run(config, trainer, workdir, n_params, writer.message)
        if start_step:
            writer.message(f"resuming at step {start_step} of {t.num_steps}"
                           + (": already finished, nothing to train" if start_step >= t.num_steps
                              else ""))
        throughput = Throughput(t.global_batch_size * seq_len,
                                flops.flops_per_token(trainer.model_cfg, seq_len))
        loader = data.BatchLoader(train_data, t.global_batch_size, seq_len, t.seed, mesh,
                                  start_step=start_step, prefetch=config.data.prefetch,
                                  rules=trainer.rules)
        if config.train.init_from and start_step == 0:  # where the fine-tune starts from
            writer.write(0, evaluate(trainer, eval_step, state["params"], val_data, config))
        loop = Loop(config, trainer, train_step, eval_step, loader, val_data, checkpointer,
                    writer, throughput, stop)
        try:
            last = _loop(loop, state)
        finally:
            loader.close()
            checkpointer.close()
            writer.close()
    return last


def _loop(loop: Loop, state) -> dict:
    config, writer, throughput = loop.config, loop.writer, loop.throughput
    t = config.train
    pending, last = [], {}
    first = True
    for step, batch in loop.loader:
        if step >= t.num_steps:
            break
        if first:  # the first call compiles: time it apart from the steady state
            with throughput.excluded():
                start = time.perf_counter()
                state, metrics = jax.block_until_ready(loop.train_step(state, batch))
                writer.message(f"compiled and ran the first step in "
                               f"{time.perf_counter() - start:.1f} s")
            first = False
        else:
            state, metrics = loop.train_step(state, batch)
            throughput.tick()
        pending.append((step, metrics))
        writer.advance()
        done = step + 1
        if done % t.log_every == 0 or done == t.num_steps:
            sources = getattr(loop.loader.dataset, "tokens_seen", None)  # per store of a mixture
            last = _log(pending, throughput, writer, config, loop.checkpointer,
                        sources(done, t.global_batch_size, loop.loader.seq_len) if sources else {})
            pending = []
        if done % t.eval_every == 0 or done == t.num_steps:
            with throughput.excluded():
                evaluation = evaluate(loop.trainer, loop.eval_step, state["params"],
                                      loop.val_data, config)
                evaluation.update(evals.during_training(loop.trainer, state["params"],
                                                        loop.val_data.tokenizer, config))
            writer.write(done, evaluation)
            last = {**last, **evaluation}
        data_state = loop.loader.state()  # the batch of step s is f(seed, s)
        if done % config.checkpoint.every == 0 or done == t.num_steps:
            with throughput.excluded():
                loop.checkpointer.save(state, data_state, config)
        if loop.stop.should_stop(done):
            _log(pending, throughput, writer, config, loop.checkpointer)
            loop.checkpointer.save(state, data_state, config, force=True)
            writer.message(f"{loop.stop.received}: saved a checkpoint at step {done}; exiting")
            break
    return last


def _log(pending, throughput, writer, config, checkpointer, extra: dict | None = None) -> dict:
    """Fetch the pending steps' metrics (one device->host sync), check them, write them."""
    if not pending:
        return {}
    host = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, host):
        if not bool(m["finite"]):
            if config.train.skip_nonfinite:
                writer.message(f"step {step}: non-finite loss/grad; update skipped")
                continue
            checkpointer.wait()
            kept = checkpointer.manager.latest_step()
            raise NonFiniteLossError(f"non-finite loss ({float(m['loss'])}) or grad norm at "
                                     f"step {step}; the state was not updated and the last "
                                     f"good checkpoint is step {kept}")
    step, m = pending[-1][0], host[-1]
    event = {"loss": float(np.mean([h["loss"] for h in host])),
             "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]), **throughput.read(),
             **(extra or {})}
    writer.write(step + 1, event)
    return event
