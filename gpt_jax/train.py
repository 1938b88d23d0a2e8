"""The training loop: resume a resolved run, step, evaluate, log, checkpoint, stop cleanly.

`train(config, workdir)` is what `gpt-jax train` calls: it resolves the run (`gpt_jax.run`),
then loops. Restarting it on the same workdir continues from the newest checkpoint;
SIGTERM/SIGINT save a checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Callable

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import data, evals, flops, run_lock, run_status, sharding
from gpt_jax.errors import ConfigMismatchError, NonFiniteLossError
from gpt_jax.evaluate import evaluate
from gpt_jax.metrics import MetricsWriter, Throughput
from gpt_jax.run import Run, resolve_run
from gpt_jax.step import Trainer


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


def initial_state(trainer: Trainer, checkpointer: ckpt_lib.Checkpointer, init_from: str,
                  seed: int):
    """(state, start_step, saved data stream or None): resumed from the workdir, else
    fine-tune params, else fresh."""
    restored = checkpointer.restore_latest(trainer.abstract_state())
    if restored is not None:
        state, meta = restored
        logging.info("resumed from %s at step %d", checkpointer.directory, meta["step"])
        return state, meta["step"], meta.get("data")
    params = None
    if init_from:
        _, params = ckpt_lib.load_params(init_from, shardings=trainer.state_shardings["params"])
        logging.info("fine-tuning from the params of %s", init_from)
    return trainer.init_state(seed, params), 0, None


def check_data_stream(saved: dict | None, now: dict, workdir: str) -> None:
    """A resume continues the checkpoint's data stream: the same seed, batch, context and
    tokens (its store's build), or a ConfigMismatchError naming what changed."""
    if not saved:
        return
    names = {"seed": "train.seed", "global_batch_size": "train.global_batch_size",
             "seq_len": "model.block_size", "data": "the training data (its store's build)"}
    diffs = [f"{names[k]}: {saved[k]!r} in the checkpoint, {now[k]!r} now"
             for k in names if saved.get(k) is not None and saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigMismatchError(
            f"resuming {workdir} at step {saved.get('step')} would change its data stream "
            f"({'; '.join(diffs)}); resume with the run's values, or start a new run from it "
            f"with --config.train.init_from={workdir}")


def describe_run(run: Run, n_params: int, padded: int, log) -> None:
    m, t = run.config.model, run.config.train
    log(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.process_count()} process(es)); mesh {dict(run.mesh.shape)}")
    padding = (f" ({padded:,} with the vocabulary padded to {m.padded_vocab_size})"
               if padded != n_params else "")
    log(f"model: {n_params:,} parameters{padding}; {m.n_layer} layers, width {m.n_embd}, "
        f"context {m.block_size}, vocab {m.vocab_size}")
    log(f"tokens per step: {t.global_batch_size * m.block_size:,} "
        f"({t.global_batch_size} x {m.block_size}, {t.microbatches} microbatch(es)); "
        f"steps: {t.num_steps}")
    c = run.config.checkpoint
    log(f"checkpoints: {ckpt_lib.checkpoint_dir(run.workdir)} (every {c.every}, keep {c.keep}); "
        f"metrics: {os.path.join(run.workdir, 'metrics.jsonl')}")


def train(config, workdir: str, explicit: frozenset[str] = frozenset()) -> dict:
    """Train (or resume) the run of `config` (a ConfigDict, dict or Config) in `workdir`;
    returns the last logged metrics. `explicit`: fields set on the command line."""
    stop = StopSignal()  # installed first: a SIGTERM during set-up still ends in a clean save
    try:
        with run_lock.hold(workdir):  # first: a second process must not touch the run
            run_status.write(workdir, "running")
            run = resolve_run(config, workdir, explicit)
            last = _train(run, stop)
            run_status.ended(workdir, run.config.train.num_steps, stop.received,
                             stop.stopped_at)
    finally:
        stop.restore()
    return last


@dataclasses.dataclass
class Loop:
    """What the training loop steps through, evaluates with and writes to."""
    run: Run
    trainer: Trainer
    train_step: Callable
    eval_step: Callable
    loader: data.BatchLoader
    checkpointer: ckpt_lib.Checkpointer
    writer: MetricsWriter
    throughput: Throughput
    stop: StopSignal


def _train(run: Run, stop: StopSignal) -> dict:
    config, workdir = run.config, run.workdir
    if jax.process_index() == 0:
        epath.Path(workdir, "config.json").write_text(config_lib.to_json(config))
    evals.training_tasks(run.tokenizer, config)  # a bad task file fails before any compile
    trainer = Trainer.create(config.model, config.train, config.optim, run.mesh, run.rules)
    checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint)
    t, seq_len = config.train, config.model.block_size
    with sharding.activate(run.mesh, run.rules):
        state, start_step, saved_stream = initial_state(trainer, checkpointer, t.init_from,
                                                        t.seed)
        stream = {"seed": t.seed, "global_batch_size": t.global_batch_size, "seq_len": seq_len,
                  "data": getattr(run.train_data, "fingerprint", None)}
        try:
            check_data_stream(saved_stream, stream, workdir)
        except ConfigMismatchError:
            checkpointer.close()
            raise
        train_step, eval_step = trainer.jit_train_step(), trainer.jit_eval_step()
        writer = MetricsWriter(workdir, t.num_steps, start_step)
        n_params = flops.count_params(config.model, padding=False)
        describe_run(run, n_params, flops.count_params(config.model), writer.message)
        if start_step:
            writer.message(f"resuming at step {start_step} of {t.num_steps}"
                           + (": already finished, nothing to train" if start_step >= t.num_steps
                              else ""))
        throughput = Throughput(t.global_batch_size * seq_len,
                                flops.flops_per_token(config.model, seq_len))
        loader = data.BatchLoader(run.train_data, t.global_batch_size, seq_len, t.seed, run.mesh,
                                  run.rules, start_step=start_step, prefetch=config.data.prefetch)
        if t.init_from and start_step == 0:  # where the fine-tune starts from
            writer.write(0, evaluate(trainer, eval_step, state["params"], run.val_data, config))
        loop = Loop(run, trainer, train_step, eval_step, loader, checkpointer, writer,
                    throughput, stop)
        try:
            last = _loop(loop, state)
        finally:
            loader.close()
            checkpointer.close()
            writer.close()
    return last


def _loop(loop: Loop, state) -> dict:
    config, writer, throughput = loop.run.config, loop.writer, loop.throughput
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
            seen = loop.run.train_data.tokens_seen(done, t.global_batch_size, loop.loader.seq_len)
            last = _log(pending, throughput, writer, t.skip_nonfinite, loop.checkpointer, seen)
            pending = []
        if done % t.eval_every == 0 or done == t.num_steps:
            with throughput.excluded():
                evaluation = evaluate(loop.trainer, loop.eval_step, state["params"],
                                      loop.run.val_data, config)
                evaluation.update(evals.during_training(loop.trainer, state["params"],
                                                        loop.run.tokenizer, config))
            writer.write(done, evaluation)
            last = {**last, **evaluation}
        data_state = loop.loader.state()  # the batch of step s is f(seed, s)
        if done % config.checkpoint.every == 0 or done == t.num_steps:
            with throughput.excluded():
                loop.checkpointer.save(state, data_state, config.to_dict())
        if loop.stop.should_stop(done):
            _log(pending, throughput, writer, t.skip_nonfinite, loop.checkpointer)
            loop.checkpointer.save(state, data_state, config.to_dict(), force=True)
            writer.message(f"{loop.stop.received}: saved a checkpoint at step {done}; exiting")
            break
    return last


def _log(pending, throughput, writer, skip_nonfinite: bool, checkpointer,
         extra: dict | None = None) -> dict:
    """Fetch the pending steps' metrics (one device->host sync), check them, write them."""
    if not pending:
        return {}
    host = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, host):
        if not bool(m["finite"]):
            if skip_nonfinite:
                writer.message(f"step {step}: non-finite loss/grad; update skipped")
                continue
            checkpointer.wait()
            kept = checkpointer.manager.latest_step()
            raise NonFiniteLossError(f"non-finite loss ({float(m['loss'])}) or grad norm at "
                                     f"step {step}; the state was not updated and the last "
                                     f"good checkpoint is step {kept}")
    step, m = pending[-1][0], host[-1]
    kept = [float(h["loss"]) for h in host if bool(h["finite"])]  # skipped steps: not averaged
    event = {"loss": float(np.mean(kept)) if kept else float("nan"),
             "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]), **throughput.read(),
             **(extra or {})}
    writer.write(step + 1, event)
    return event
