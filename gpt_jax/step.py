"""The `train` section, the loss, and the Trainer: state shardings, init, the jitted (sharded,
donated) train and eval steps."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax import sharding
from gpt_jax.axes import LogicalRules
from gpt_jax.errors import EvalError
from gpt_jax.evals.tasks import parse_specs
from gpt_jax.model import (
    GPT,
    ModelConfig,
    abstract_params,
    head_kernel_DV,
    init_params,
    lm_head_logits,
)
from gpt_jax.optim import OptimConfig
from gpt_jax.schema import Section, field

TrainState = dict  # {"step": int32[], "params": pytree, "opt_state": pytree, "rng": uint32[2]}


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """The `train` section: the step (batch, microbatches, z-loss) and the loop around it."""
    name = "train"
    seed: int = field(0)  # params' init and the batch order
    global_batch_size: int = field(32)
    microbatches: int = field(1)  # gradient accumulation steps inside one train step
    num_steps: int = field(1000)
    log_every: int = field(25)
    eval_every: int = field(250)
    eval_batches: int = field(20)
    z_loss: float = field(0.0)
    skip_nonfinite: bool = field(False)  # skip an update with a non-finite loss/grad, not stop
    init_from: str = field("")  # a run directory or checkpoint to fine-tune from
    eval_tasks: str = field("")  # downstream tasks at each eval, e.g. "nextline,hellaswag:F"
    eval_tasks_examples: int = field(200)  # examples per task at each eval (0: all)

    def check(self) -> None:
        self.positive("global_batch_size", "microbatches", "num_steps", "log_every",
                      "eval_every", "eval_batches")
        self.require(self.global_batch_size % self.microbatches == 0,
                     f"train.global_batch_size={self.global_batch_size} is not divisible by "
                     f"train.microbatches={self.microbatches}")
        self.require(self.eval_tasks_examples >= 0, f"train.eval_tasks_examples="
                     f"{self.eval_tasks_examples} must be >= 0 (0: all)")
        if self.eval_tasks:
            try:
                parse_specs(self.eval_tasks)
            except EvalError as e:
                self.require(False, f"train.eval_tasks: {e}")

    def check_mesh(self, batch_shards: int) -> None:
        """Each microbatch's rows split evenly over the batch's devices."""
        rows = self.global_batch_size // self.microbatches
        self.require(rows % batch_shards == 0, f"train.global_batch_size/microbatches={rows} "
                     f"is not divisible by the data*fsdp={batch_shards} devices it is split "
                     "over")


def cross_entropy(logits_BTV, targets_BT, weights_BT=None, z_loss: float = 0.0):
    """(sum of per-token losses, sum of weights); fp32 whatever the logits' dtype."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
    loss_BT = lse_BT - target_logit_BT
    if z_loss:
        loss_BT = loss_BT + z_loss * jnp.square(lse_BT)
    if weights_BT is None:
        weights_BT = jnp.ones_like(loss_BT)
    weights_BT = weights_BT.astype(jnp.float32)
    return jnp.sum(loss_BT * weights_BT), jnp.sum(weights_BT)


def chunked_cross_entropy(cfg: ModelConfig, x_BTD, kernel_DV, targets_BT, weights_BT=None,
                          z_loss: float = 0.0):
    """`cross_entropy` of `lm_head_logits(cfg, x_BTD, kernel_DV)`, cfg.loss_chunks positions'
    chunks at a time: a scan whose body is one `jax.checkpoint`, so the forward pass keeps no
    chunk's logits and the backward pass makes each again; [B, T/loss_chunks, V] at most."""
    B, T, _ = x_BTD.shape
    n = cfg.loss_chunks
    if T % n:
        raise ValueError(f"model.loss_chunks={n} does not divide the sequence length {T}")
    if weights_BT is None:
        weights_BT = jnp.ones((B, T), jnp.float32)

    def chunked(a):  # [B, T, ...] -> [n, B, T/n, ...]: the scan runs over the chunks
        return jnp.swapaxes(a.reshape(B, n, T // n, *a.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_sums(kernel_DV, x_BtD, targets_Bt, weights_Bt):  # t: one chunk's positions
        return cross_entropy(lm_head_logits(cfg, x_BtD, kernel_DV), targets_Bt, weights_Bt,
                             z_loss)

    def add_chunk(sums, chunk):
        loss_sum, count = chunk_sums(kernel_DV, *chunk)
        return (sums[0] + loss_sum, sums[1] + count), None

    sums, _ = jax.lax.scan(add_chunk, (jnp.float32(0), jnp.float32(0)),
                           (chunked(x_BTD), chunked(targets_BT), chunked(weights_BT)))
    return sums


@dataclasses.dataclass
class Trainer:
    """Everything the steps close over: model, optimizer, mesh, shardings. Built once per run."""
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    mesh: Mesh
    rules: LogicalRules
    model: GPT
    train_model: GPT
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: dict
    batch_sharding: NamedSharding

    @classmethod
    def create(cls, model_cfg: ModelConfig, train_cfg: TrainConfig, optim_cfg: OptimConfig,
               mesh: Mesh, rules: LogicalRules) -> "Trainer":
        tx, schedule = optim_cfg.build(train_cfg.num_steps)
        param_sh = sharding.param_shardings(model_cfg, mesh, rules)
        opt_abs = jax.eval_shape(tx.init, abstract_params(model_cfg))
        repl = sharding.replicated(mesh)
        masked = lambda x: isinstance(x, optax.MaskedNode)  # a leaf multi_transform left out
        opt_sh = optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, opt_abs, param_sh,
                                       transform_non_params=lambda _: repl, is_leaf=masked)
        state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh, "rng": repl}
        return cls(model_cfg, train_cfg, mesh, rules, GPT(model_cfg),
                   GPT(model_cfg, deterministic=False), tx, schedule, state_sh,
                   sharding.batch_sharding(mesh, rules))

    @classmethod
    def for_config(cls, config: Any, mesh: Mesh) -> "Trainer":
        """`create` from a whole config (its model, train, optim and mesh.rules)."""
        return cls.create(config.model, config.train, config.optim, mesh, config.mesh.rules)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the target for restoring a checkpoint."""
        params = abstract_params(self.model_cfg)
        shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                  "opt_state": jax.eval_shape(self.tx.init, params),
                  "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def _init_state(self, rng) -> TrainState:
        params = init_params(self.model, rng)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": self.tx.init(params), "rng": jax.random.fold_in(rng, 1)}

    def init_state(self, seed: int, params=None) -> TrainState:
        """A fresh state born sharded; with `params` (fine-tuning), those params and a new optimizer."""
        rng = jax.random.PRNGKey(seed)
        with sharding.activate(self.mesh, self.rules):
            if params is None:
                return jax.jit(self._init_state, out_shardings=self.state_shardings)(rng)
            params = sharding.shard_like(params, self.state_shardings["params"])
            opt_state = jax.jit(self.tx.init,
                                out_shardings=self.state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        rng = jax.device_put(jax.random.fold_in(rng, 1), self.state_shardings["rng"])
        return {"step": step, "params": params, "opt_state": opt_state, "rng": rng}

    # -- the steps ------------------------------------------------------------------------

    def loss_sums(self, params, batch, rng, model: GPT):
        z_loss = self.train_cfg.z_loss
        if self.model_cfg.loss_chunks > 1:
            x_BTD = model.apply({"params": params}, batch["inputs"], rngs={"dropout": rng},
                                hidden_only=True)
            return chunked_cross_entropy(self.model_cfg, x_BTD,
                                         head_kernel_DV(self.model_cfg, params),
                                         batch["targets"], batch.get("weights"), z_loss)
        logits_BTV = model.apply({"params": params}, batch["inputs"], rngs={"dropout": rng})
        return cross_entropy(logits_BTV, batch["targets"], batch.get("weights"), z_loss)

    def _grads(self, params, batch, rng):
        """Gradient of the mean token loss, accumulated over microbatches with lax.scan."""
        k = self.train_cfg.microbatches

        def sums_and_grads(microbatch, i):
            return jax.value_and_grad(
                lambda p: self.loss_sums(p, microbatch, jax.random.fold_in(rng, i),
                                         self.train_model), has_aux=True)(params)

        if k == 1:  # no loop: a one-trip while loop costs carry copies and blocks fusion
            (loss_sum, count), grad_sum = sums_and_grads(batch, 0)
        else:
            def micro(carry, microbatch):
                grad_acc, acc_loss, i, acc_count = carry
                (loss_sum, count), g = sums_and_grads(microbatch, i)
                grad_acc = jax.tree.map(jnp.add, grad_acc, g)
                return (grad_acc, acc_loss + loss_sum, i + 1, acc_count + count), None

            # Row r goes to microbatch r % k, so every microbatch keeps an even share per device.
            rows_sharded = NamedSharding(self.mesh, P(None, self.rules.batch_axes))
            micro_batches = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(
                    jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1),
                    rows_sharded), batch)
            init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.int32(0),
                    jnp.float32(0))
            (grad_sum, loss_sum, _, count), _ = jax.lax.scan(micro, init, micro_batches)
        count = jnp.maximum(count, 1.0)
        # the gradient keeps each param's dtype (bf16 params: bf16 grads and AdamW moments)
        return loss_sum / count, jax.tree.map(lambda g: (g / count).astype(g.dtype), grad_sum)

    def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        loss, grads = self._grads(state["params"], batch, rng)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step never reaches the state: it is skipped (or the loop stops on it).
        # A cond, not a per-leaf where: the where made XLA copy every donated leaf first.
        params, opt_state = jax.lax.cond(finite, lambda: (params, opt_state),
                                         lambda: (state["params"], state["opt_state"]))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                     "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(state["step"]),
                   "finite": finite}
        return new_state, metrics

    def jit_train_step(self) -> Callable:
        return jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                       donate_argnums=(0,))

    def _eval_step(self, params, batch):
        return self.loss_sums(params, batch, jax.random.PRNGKey(0), self.model)

    def jit_eval_step(self) -> Callable:
        return jax.jit(self._eval_step,
                       in_shardings=(self.state_shardings["params"], self.batch_sharding),
                       out_shardings=sharding.replicated(self.mesh))

