"""An lm-evaluation-harness model for gpt_jax runs (needs the `eval` extra: lm-eval).

    python -m gpt_jax.evals.harness --model gpt_jax --model_args workdir=runs/x --tasks ...

is `lm_eval` with this model registered (lm-eval 0.4 has no plugin entry point for models, so
the plain `lm_eval` command only sees it after `import gpt_jax.evals.harness`, as in
`lm_eval.simple_evaluate(model="gpt_jax", ...)`). Requests are scored by
`gpt_jax.evals.scoring.loglikelihoods` (fixed-shape batches, one compile per call) and
generated on the serving engine, all of a call's requests at once, each cut at its stop
strings; params are sharded over the mesh of the run's config.

In a multi-process run (jax.distributed, e.g. launch/local_multihost.py, which adds
--coordinator_address / --num_processes / --process_id) every process loads the model, process
0 runs lm-eval, and the others follow: each scoring or generation call on process 0 first
broadcasts its token ids (`exchange`), then every process runs the same sharded computation
(for generation: the same engine schedule, which depends only on the requests).
Process 0 ends the followers with a stop message, also when lm-eval fails.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from jax.experimental.multihost_utils import broadcast_one_to_all
from lm_eval._cli import HarnessCLI
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import setup_logging

from gpt_jax import api, checkpoint
from gpt_jax.commands.common import start_distributed
from gpt_jax.config import Config
from gpt_jax.errors import CommandError
from gpt_jax.evals.scoring import Request, loglikelihoods
from gpt_jax.sampling_filters import power_of_two_bucket
from gpt_jax.serve.engine import Request as EngineRequest
from gpt_jax.serve.engine import Sampling

STOP, SCORE, GENERATE = 0, 1, 2  # what process 0 asks the followers to do


class Message(NamedTuple):
    op: int  # STOP, SCORE or GENERATE
    # SCORE: len(context), len(continuation) per request, and the ids concatenated;
    # GENERATE: see `pack_generations`
    sizes: np.ndarray
    tokens: np.ndarray


def exchange(message: Message | None) -> Message:
    """Process 0's `message` on every process: process 0 passes it, the followers None.

    Two broadcasts: a fixed-shape header, then the ids padded to power-of-two lengths (few
    distinct shapes, so few compilations of the broadcast).
    """
    lead = message is not None
    header = np.array([message.op, len(message.sizes), len(message.tokens)] if lead else
                      [0, 0, 0], np.int32)
    op, n_sizes, n_tokens = map(int, broadcast_one_to_all(header, is_source=lead))
    body = tuple(np.zeros(power_of_two_bucket(n), np.int32) for n in (n_sizes, n_tokens))
    if lead:
        body[0][:n_sizes], body[1][:n_tokens] = message.sizes, message.tokens
    sizes, tokens = broadcast_one_to_all(body, is_source=lead)
    return Message(op, sizes[:n_sizes], tokens[:n_tokens])


class Generation(NamedTuple):
    prompt: list[int]
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]


def pack_generations(gens: Sequence[Generation]) -> Message:
    """sizes: per generation len(prompt), max_tokens, the temperature's float32 bits and the
    stop strings' UTF-8 bytes (NUL-separated); tokens: the prompts, then those bytes."""
    stops = [list("\0".join(g.stop).encode()) for g in gens]
    sizes = [n for g, b in zip(gens, stops) for n in (
        len(g.prompt), g.max_tokens, int(np.float32(g.temperature).view(np.int32)), len(b))]
    tokens = [t for g in gens for t in g.prompt] + [x for b in stops for x in b]
    return Message(GENERATE, np.array(sizes, np.int32), np.array(tokens, np.int32))


def unpack_generations(message: Message) -> list[Generation]:
    rows = message.sizes.reshape(-1, 4)
    ids, at = message.tokens.tolist(), 0
    prompts = []
    for n in rows[:, 0].tolist():
        prompts.append(ids[at:at + n])
        at += n
    gens = []
    for prompt, (_, new, bits, n_bytes) in zip(prompts, rows.tolist()):
        text = bytes(ids[at:at + n_bytes]).decode()
        at += n_bytes
        gens.append(Generation(prompt, new, float(np.int32(bits).view(np.float32)),
                               tuple(text.split("\0")) if text else ()))
    return gens


def flatten(requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
    sizes = [n for c, x in requests for n in (len(c), len(x))]
    tokens = [t for c, x in requests for t in (*c, *x)]
    return np.array(sizes, np.int32), np.array(tokens, np.int32)


def unflatten(sizes: np.ndarray, tokens: np.ndarray) -> list[Request]:
    ends = np.cumsum(sizes).tolist()
    pieces = [tokens[end - n:end].tolist() for n, end in zip(sizes.tolist(), ends)]
    return [Request(c, x) for c, x in zip(pieces[::2], pieces[1::2])]


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Trailing spaces of the context belong to the continuation (" word" is one GPT-2 token)."""
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped):] + continuation


def fsdp_mesh(workdir: str, fsdp: int):
    """The run's mesh with params split `fsdp` ways (e.g. over every process's devices)."""
    config = Config.from_dict(checkpoint.load_config(workdir), strict=False)
    return config.replace({"mesh.data": -1, "mesh.fsdp": fsdp, "mesh.tensor": 1}).mesh.make()


@register_model("gpt_jax")
class GptJaxLM(LM):
    def __init__(self, workdir: str, batch_rows: int | str = 32, shard: bool | str = True,
                 fsdp: int | str = 0, max_gen_toks: int | str = 256, **unused: Any):
        super().__init__()
        shard = str(shard).lower() not in ("false", "0")
        self.lm = api.load(workdir, shard=shard,
                               mesh=fsdp_mesh(workdir, int(fsdp)) if shard and int(fsdp) else None)
        self.batch_rows = int(batch_rows)
        self.max_gen_toks = int(max_gen_toks)
        self.tok = self.lm.tokenizer
        self.eot = int(self.tok.eos_id)
        self.leads = jax.process_count() > 1 and jax.process_index() == 0

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LM:
        """lm-eval's constructor; in a multi-process run, the model `main` already loaded."""
        return DRIVER.get("lm") or super().create_from_arg_obj(arg_dict, additional_config)

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text)) if text else []

    def _score(self, requests: list[Request]):
        if self.leads:
            exchange(Message(SCORE, *flatten(requests)))
        return loglikelihoods(self.lm.model_cfg, self.lm.params, requests,
                              batch_rows=self.batch_rows, mesh=self.lm.mesh, rules=self.lm.rules)

    def _generate(self, gens: list[Generation]) -> list[str]:
        """Each generation's text, cut at its first stop string: all of them on the serving
        engine at once (continuous batching over its slots)."""
        if self.leads:
            exchange(pack_generations(gens))
        handles = self.lm.engine.generate([
            EngineRequest(g.prompt, g.max_tokens, Sampling(g.temperature, 0, 1.0, 0),
                          stop=g.stop) for g in gens])
        return [h.choices[0].text for h in handles]

    def follow(self) -> None:
        """A follower's loop: join each of process 0's computations until it says stop."""
        while (message := exchange(None)).op != STOP:
            try:
                if message.op == SCORE:
                    self._score(unflatten(message.sizes, message.tokens))
                else:
                    self._generate(unpack_generations(message))
            except ValueError:
                pass  # a bad request, found before any computation: process 0 raises it

    def stop_followers(self) -> None:
        if self.leads:
            exchange(Message(STOP, np.zeros(0, np.int32), np.zeros(0, np.int32)))

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for instance in requests:
            context, continuation = split_pair(*instance.args[:2])
            pairs.append(Request(self._encode(context) or [self.eot],
                                 self._encode(continuation)))
        return [(s.logprob, s.greedy) for s in self._score(pairs)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Whole-text log-likelihood: windows of block_size tokens, each after as much of the
        preceding text as fits (the first after the EOT token)."""
        block = self.lm.model_cfg.block_size
        pairs, owners = [], []
        for i, instance in enumerate(requests):
            ids = [self.eot] + self._encode(instance.args[0])
            for start in range(1, len(ids), block):
                pairs.append(Request(ids[:start], ids[start:start + block]))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, score in zip(owners, self._score(pairs)):
            totals[i] += score.logprob
        return totals

    def generate_until(self, requests) -> list[str]:
        gens, block = [], self.lm.model_cfg.block_size
        for instance in requests:
            context, kwargs = instance.args[0], dict(instance.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self._encode(context) or [self.eot]
            new = max(1, min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), block - 1))
            temperature = float(kwargs.pop("temperature", 0.0))
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            gens.append(Generation(ids[-(block - new):], new, temperature,
                                   tuple(u for u in until if u)))
        return self._generate(gens) if gens else []


DRIVER: dict[str, GptJaxLM] = {}  # "lm": process 0's model in a multi-process run


def main() -> None:
    """lm-eval's command line; multi-process when jax.distributed is configured."""
    dist = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name, kind in (("coordinator_address", str), ("num_processes", int),
                       ("process_id", int)):
        dist.add_argument(f"--{name}", type=kind)
    settings, sys.argv[1:] = dist.parse_known_args(sys.argv[1:])
    try:
        start_distributed(settings.coordinator_address, settings.num_processes,
                          settings.process_id)
    except CommandError as e:
        raise SystemExit(f"gpt_jax.evals.harness: {e}") from None
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    if jax.process_count() == 1:
        return parser.execute(args)
    if getattr(args, "model", None) != "gpt_jax":
        raise SystemExit("gpt_jax.evals.harness: a multi-process run needs --model gpt_jax")
    lm = GptJaxLM.create_from_arg_obj(args.model_args or {})  # every process, together
    if not lm.leads:
        return lm.follow()
    DRIVER["lm"] = lm
    try:
        parser.execute(args)
    finally:
        lm.stop_followers()


if __name__ == "__main__":
    main()
