"""`gpt-jax sample --workdir=runs/demo --prompt="def main(" --max_new_tokens=200 ...`

Prints each sample after a header line. Flags left unset take the run's `config.sample` values.
`--prompt_file` holds one prompt per line (`\\n` inside a line stands for a newline).
"""

from __future__ import annotations

import sys

from absl import flags

from gpt_jax.commands.common import usage_error
from gpt_jax.errors import CommandError


def _define(define, name: str, default, help_text: str) -> None:
    """Define a flag unless another command module imported in this process already did."""
    if name not in flags.FLAGS:
        define(name, default, help_text)


_define(flags.DEFINE_string, "workdir", None,
        "Required: a run directory (latest checkpoint) or a checkpoint step directory.")
_define(flags.DEFINE_string, "prompt", None,
        "The prompt (default: the run's sample.prompt; '' starts from BOS).")
_define(flags.DEFINE_string, "prompt_file", None, "A file with one prompt per line.")
_define(flags.DEFINE_integer, "max_new_tokens", None, "Tokens to generate per sample.")
_define(flags.DEFINE_float, "temperature", None, "0 = greedy.")
_define(flags.DEFINE_integer, "top_k", None, "Keep the k most likely tokens (0 = off).")
_define(flags.DEFINE_float, "top_p", None, "Nucleus sampling mass in (0, 1] (1 = off).")
_define(flags.DEFINE_integer, "num_samples", None, "Samples per prompt.")
_define(flags.DEFINE_integer, "seed", None, "Random seed.")
_define(flags.DEFINE_bool, "truncate_prompt", False,
        "Keep the end of a prompt that does not fit the context instead of failing.")
_define(flags.DEFINE_bool, "shard", False,
        "Shard params and cache over all devices with the run's mesh config.")
_define(flags.DEFINE_bool, "logprobs", False, "Also print the mean log-prob of each sample.")

FLAGS = flags.FLAGS


def read_prompts(prompt: str | None, prompt_file: str | None, default: str) -> list[str]:
    """The prompts from --prompt / --prompt_file (not both), else the config's default."""
    if prompt is not None and prompt_file:
        raise CommandError("pass --prompt or --prompt_file, not both")
    if prompt_file:
        with open(prompt_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        if not prompts:
            raise CommandError(f"--prompt_file={prompt_file} has no non-empty line")
        return prompts
    return [default if prompt is None else prompt.replace("\\n", "\n")]


def main(argv: list[str]) -> None:
    del argv
    # Imported here, not at the top: flag parsing and --help stay fast.
    from gpt_jax import api

    if not FLAGS.workdir:
        raise usage_error("--workdir is required (a run directory or checkpoint)")
    lm = api.load(FLAGS.workdir, shard=FLAGS.shard)
    prompts = read_prompts(FLAGS.prompt, FLAGS.prompt_file, lm.config.sample.prompt)
    gen = lm.generate_tokens(prompts, max_new_tokens=FLAGS.max_new_tokens,
                             temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                             top_p=FLAGS.top_p, num_samples=FLAGS.num_samples,
                             seed=FLAGS.seed, truncate_prompt=FLAGS.truncate_prompt,
                             return_logprobs=FLAGS.logprobs)
    per_prompt = len(gen.tokens) // len(prompts)
    for r, tokens in enumerate(gen.tokens):
        header = f"=== prompt {r // per_prompt}, sample {r % per_prompt}"
        if gen.logprobs is not None and gen.logprobs[r]:
            header += f", mean log-prob {sum(gen.logprobs[r]) / len(gen.logprobs[r]):.3f}"
        print(header + " ===")
        print(lm.tokenizer.decode(gen.prompt_tokens[r]) + lm.tokenizer.decode(tokens))
    sys.stdout.flush()
