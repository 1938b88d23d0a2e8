"""`gpt-jax convert --from=hf --hf_dir=gpt2/ --workdir=runs/gpt2` (and `--to=hf` back).

--from=hf: a local Hugging Face GPT-2 directory (config.json, model.safetensors or
  pytorch_model.bin, vocab.json + merges.txt) -> a run directory that `sample`, `eval` and
  `train --config.train.init_from=...` use.
--to=hf: a run directory (latest checkpoint) or one checkpoint step -> a directory that
  `transformers.GPT2LMHeadModel.from_pretrained` loads. Nothing is downloaded.
"""

from __future__ import annotations

from absl import flags

from gpt_jax.commands.common import CommandError, usage_error


def _define(define, name: str, default, help_text: str, *args) -> None:
    if name not in flags.FLAGS:
        define(name, default, *args, help_text)


_define(flags.DEFINE_enum, "from", None, "Convert from this format into --workdir.", ["hf"])
_define(flags.DEFINE_enum, "to", None, "Convert --workdir into this format.", ["hf"])
_define(flags.DEFINE_string, "hf_dir", None, "The Hugging Face model directory (in or out).")
_define(flags.DEFINE_string, "workdir", None, "The gpt_jax run directory (out or in).")
_define(flags.DEFINE_integer, "vocab_multiple", 1, "--from=hf: pad the vocabulary rows to a "
        "multiple of this (model.vocab_multiple, e.g. 128); --to=hf drops the padding.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    source, target = FLAGS["from"].value, FLAGS["to"].value
    if (source is None) == (target is None):
        raise usage_error("give exactly one of --from=hf or --to=hf")
    if not FLAGS.hf_dir or not FLAGS.workdir:
        raise usage_error("needs --hf_dir and --workdir")
    # Imported here, not at the top: flag parsing and --help stay fast.
    from gpt_jax.data.files import DataError
    from gpt_jax.hf import ConversionError, from_hf, to_hf

    try:
        if source == "hf":
            from_hf(FLAGS.hf_dir, FLAGS.workdir, vocab_multiple=FLAGS.vocab_multiple)
            print(f"converted {FLAGS.hf_dir} -> run directory {FLAGS.workdir}")
        else:
            to_hf(FLAGS.workdir, FLAGS.hf_dir)
            print(f"converted {FLAGS.workdir} -> Hugging Face directory {FLAGS.hf_dir}")
    except (ConversionError, DataError, FileNotFoundError) as e:
        raise CommandError(str(e)) from e
