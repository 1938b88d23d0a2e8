"""Every test runs on 8 simulated CPU devices (set before JAX starts its backend); a test's own
subprocess may ask for 1 with GPT_JAX_TEST_DEVICES=1."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
DEVICES = int(os.environ.get("GPT_JAX_TEST_DEVICES", "8"))  # 1: a test's own subprocess
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={DEVICES}").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", DEVICES)

from gpt_jax.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the gpt-jax CLI does: no page faults on XLA's step buffers


import pathlib  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402

CORPUS_FILES = ("json/encoder.py", "json/decoder.py", "textwrap.py", "string.py",
                "bisect.py", "heapq.py", "colorsys.py", "keyword.py", "this.py", "glob.py")


def write_corpus(folder: pathlib.Path) -> pathlib.Path:
    """A small text corpus (a few stdlib modules, ~100 KB) copied into `folder`."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in CORPUS_FILES:
        src = stdlib / name
        if src.exists():
            (folder / name.replace("/", "_")).write_text(src.read_text(errors="replace"))
    return folder


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> pathlib.Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_run_config(corpus: pathlib.Path, cache: pathlib.Path, **train):
    """configs/tiny.py on a local text_files corpus, byte tokenizer, caches under `cache`."""
    from gpt_jax import config as config_lib

    config = config_lib.load_preset("tiny")
    config.data.update(source="text_files", paths=str(corpus), tokenizer="byte",
                       cache_dir=str(cache / "tokens"), data_dir=str(cache / "tfds"))
    config.train.update(train)
    return config
