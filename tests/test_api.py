"""`gpt_jax.load` / `LoadedModel.generate` and the `gpt-jax sample` command."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from configs.tiny import get_config
from gpt_jax import api, sample
from gpt_jax.config import typed
from gpt_jax.model import GPT

pytestmark = pytest.mark.e2e  # every test here runs a training run or a process


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ().:=\n0123456"


class TinyCharTokenizer:
    """pad 0, bos 1, eos 2, then one id per character of ALPHABET (vocab 64)."""
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int = 64):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) + 3 for c in text]

    def decode(self, ids) -> str:
        return "".join(ALPHABET[i - 3] for i in ids if i >= 3)


@pytest.fixture(scope="module")
def lm() -> api.LoadedModel:
    config = get_config()
    cfg = typed(config).model
    params = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return api.LoadedModel(typed(config), params, TinyCharTokenizer())


KW = dict(max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9)


def test_generate_returns_prompt_major_strings(lm):
    texts = lm.generate(["def main(", "import "], num_samples=2, seed=4, **KW)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    gen = lm.generate_tokens(["def main(", "import "], num_samples=2, seed=4,
                             return_logprobs=True, **KW)
    assert gen.prompt_tokens[0] == gen.prompt_tokens[1] == lm.tokenizer.encode("def main(")
    assert gen.prompt_tokens[2] == lm.tokenizer.encode("import ")
    assert [lm.tokenizer.decode(t) for t in gen.tokens] == texts
    assert all(len(lp) == len(t) and all(x <= 0 for x in lp)
               for lp, t in zip(gen.logprobs, gen.tokens))
    # The token-level core with the same arguments gives the same ids.
    core = sample.generate(lm.engine, [gen.prompt_tokens[0]], num_samples=2, seed=4, **KW)
    assert core.tokens == gen.tokens[:2]


def test_empty_prompt_starts_from_bos_and_defaults_fit_the_context(lm):
    gen = lm.generate_tokens([""], seed=0)  # config.sample: max_new_tokens=200 > block_size
    assert gen.prompt_tokens == [[TinyCharTokenizer.bos_id]]
    assert 1 <= len(gen.tokens[0]) <= lm.model_cfg.block_size - 1


def test_explicit_overflow_and_bad_values_are_errors(lm):
    with pytest.raises(ValueError, match="max_new_tokens=40"):
        lm.generate(["abc"], max_new_tokens=40)
    with pytest.raises(ValueError, match="top_p=0"):
        lm.generate(["abc"], max_new_tokens=4, top_p=0)
    with pytest.raises(ValueError, match="longer than the context"):
        lm.generate(["x" * 40], max_new_tokens=4)


def test_tokenizer_vocab_mismatch_is_an_error(lm):
    with pytest.raises(ValueError, match="tokenizer vocab_size=259 does not fit"):
        api.LoadedModel(lm.config, lm.params, TinyCharTokenizer(vocab_size=259))


def test_load_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        api.load(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        api.load(str(tmp_path))


def test_cli_prints_every_sample(lm, monkeypatch, capsys, tmp_path):
    from gpt_jax.commands import sample as command

    monkeypatch.setattr(api, "load", lambda path, shard=False: lm)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("def main(\nimport \n")
    argv = ["gpt-jax sample", "--workdir=unused", f"--prompt_file={prompt_file}",
            "--max_new_tokens=6", "--temperature=0.9", "--top_k=20", "--top_p=0.9",
            "--num_samples=2", "--seed=4"]
    flags.FLAGS(argv)
    try:
        command.main(argv)
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    want = lm.generate(["def main(", "import "], num_samples=2, seed=4, **KW)
    for r, text in enumerate(want):
        assert f"=== prompt {r // 2}, sample {r % 2} ===" in out
        assert ("def main(" if r < 2 else "import ") + text in out


def _train_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gpt_jax.commands.train") is not None


@pytest.mark.skipif(not _train_available(), reason="needs gpt_jax.commands.train")
def test_load_a_trained_run_and_sample_from_the_cli(tmp_path):
    workdir = str(tmp_path / "run")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "gpt_jax.cli", "train", "--config=configs/tiny.py",
                    f"--workdir={workdir}", "--config.train.num_steps=10"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    loaded = api.load(workdir)
    texts = loaded.generate(["def "], max_new_tokens=5, temperature=0.0, num_samples=2)
    assert len(texts) == 2 and texts[0] == texts[1]
    result = subprocess.run([sys.executable, "-m", "gpt_jax.cli", "sample",
                             f"--workdir={workdir}", "--prompt=def ", "--max_new_tokens=5",
                             "--temperature=0"], cwd=ROOT, env=env, check=True,
                            capture_output=True, text=True)
    assert "=== prompt 0, sample 0 ===" in result.stdout and "def " + texts[0] in result.stdout
