"""The Python API: `gpt_jax.load(path)` -> a `LoadedModel` with `generate()`.

    import gpt_jax
    lm = gpt_jax.load("runs/demo")                  # a run directory or one checkpoint step
    texts = lm.generate(["def main(", "import "], max_new_tokens=100, temperature=0.8,
                        top_k=40, num_samples=2, seed=0)
    # 4 strings, prompt-major: [p0 s0, p0 s1, p1 s0, p1 s1]; completions only
    gen = lm.generate_tokens(["def main("], max_new_tokens=20, return_logprobs=True)

Arguments left as None take the run's `config.sample` values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

from etils import epath
from jax.sharding import Mesh

from gpt_jax import checkpoint, evals
from gpt_jax import sample as sample_lib
from gpt_jax.config import Config
from gpt_jax.errors import NoCheckpointError, SamplingError
from gpt_jax.run import run_tokenizer
from gpt_jax.serve.engine import Engine, EngineConfig


class Generation(NamedTuple):
    """Token-level results, one entry per (prompt, sample), prompt-major."""
    prompt_tokens: list[list[int]]  # the prompt ids used (after BOS / truncation)
    tokens: list[list[int]]  # generated ids; an EOS that ended them is not included
    logprobs: list[list[float]] | None  # per generated token, under the model (temperature 1)
    finish_reasons: list[str]  # "stop" (EOS) or "length"


def special_id(tokenizer, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return None if value is None or value < 0 else int(value)


@dataclasses.dataclass
class LoadedModel:
    """What sampling needs: the run's config, params, tokenizer (and optionally a mesh), and
    the serving engine every generation runs on (made on first use, `slots` decode slots)."""
    config: Config
    params: Any
    tokenizer: Any
    mesh: Mesh | None = None
    slots: int = EngineConfig.slots

    def __post_init__(self):
        self.model_cfg = self.config.model
        if self.tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise SamplingError(f"tokenizer vocab_size={self.tokenizer.vocab_size} does not fit "
                                f"the checkpoint's model.vocab_size={self.model_cfg.vocab_size}; "
                                "the tokenizer must be the one the model was trained with")
        self.rules = None if self.mesh is None else self.config.mesh.rules
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.model_cfg, self.params, self.tokenizer,
                                  EngineConfig(slots=self.slots), self.mesh, self.rules)
        return self._engine

    def encode(self, prompt: str) -> list[int]:
        """Token ids of `prompt`; an empty prompt starts from the tokenizer's BOS token."""
        ids = list(self.tokenizer.encode(prompt)) if prompt else []
        if not ids:
            bos = special_id(self.tokenizer, "bos_id")
            if bos is None:
                raise SamplingError("the prompt is empty and the tokenizer has no bos_id to start "
                                 "from; pass a non-empty prompt")
            ids = [bos]
        return ids

    def generate_tokens(self, prompts: Sequence[str] | Sequence[Sequence[int]] | str, *,
                        max_new_tokens: int | None = None, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None,
                        num_samples: int | None = None, seed: int | None = None,
                        truncate_prompt: bool = False, stop_at_eos: bool = True,
                        return_logprobs: bool = False) -> Generation:
        """Sample from strings or token-id lists; see `gpt_jax.sample.generate`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.encode(p) if isinstance(p, str) else [int(t) for t in p] or self.encode("")
               for p in prompts]
        s = self.config.sample
        if max_new_tokens is None:  # the config default, shortened to fit the longest prompt
            longest = max((len(p) for p in ids), default=0)
            max_new_tokens = max(1, min(s.max_new_tokens, self.model_cfg.block_size - longest))
        out = sample_lib.generate(
            self.engine, ids, max_new_tokens=max_new_tokens,
            temperature=s.temperature if temperature is None else temperature,
            top_k=s.top_k if top_k is None else top_k,
            top_p=s.top_p if top_p is None else top_p,
            num_samples=s.num_samples if num_samples is None else num_samples,
            seed=s.seed if seed is None else seed, stop_at_eos=stop_at_eos,
            truncate_prompt=truncate_prompt)
        return Generation(out.prompts, out.tokens, out.logprobs if return_logprobs else None,
                          out.finish_reasons)

    def generate(self, prompts: Sequence[str] | str, *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, num_samples: int | None = None,
                 seed: int | None = None, truncate_prompt: bool = False) -> list[str]:
        """Completions (without the prompt, EOS dropped), len(prompts) * num_samples strings."""
        gen = self.generate_tokens(prompts, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   num_samples=num_samples, seed=seed,
                                   truncate_prompt=truncate_prompt)
        return [self.tokenizer.decode(t) for t in gen.tokens]


def load(path: str, *, mesh: Mesh | None = None, shard: bool = False,
         tokenizer: Any = None, slots: int = EngineConfig.slots) -> LoadedModel:
    """Config, params and tokenizer of a run directory or checkpoint step directory.

    `mesh`: sample on it (params and cache sharded by the config's logical rules);
    `shard=True`: build that mesh from the config's `mesh` section over all devices.
    Raises NoCheckpointError (a FileNotFoundError) when `path` holds no checkpoint,
    SamplingError when the tokenizer does not fit the model.
    """
    if not epath.Path(path).exists():
        raise NoCheckpointError(f"{path} does not exist; expected a run directory (with "
                                "checkpoints/) or a checkpoint step directory")
    if shard and mesh is None:
        mesh = Config.from_dict(checkpoint.load_config(path), strict=False).mesh.make()
    raw, params = checkpoint.load_params(path, mesh=mesh)  # sharded by the run's rules
    return LoadedModel(Config.from_dict(raw, strict=False), params,
                       tokenizer or run_tokenizer(path), mesh, slots)


def evaluate_run(path: str, spec: str, *, limit: int = 0, batch_rows: int = 32) -> dict:
    """Score `spec`'s tasks (gpt_jax.evals) with the checkpoint at `path` (a run directory, a
    converted Hugging Face checkpoint's run directory, or one step), rows split over every
    device."""
    config = Config.from_dict(checkpoint.load_config(path), strict=False)
    mesh = config.replace({"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1}).mesh.make()
    lm = load(path, mesh=mesh)
    tasks = evals.load_tasks(spec, limit=limit, config=lm.config)
    return evals.run_tasks(lm.model_cfg, lm.params, lm.tokenizer, tasks, batch_rows=batch_rows,
                           mesh=lm.mesh, rules=lm.rules)
