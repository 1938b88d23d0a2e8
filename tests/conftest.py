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
import subprocess  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """In the fast tier (`-m "not e2e"`) a test that starts a process fails, naming the rule:
    mark it `e2e` (what starts processes, trains or compiles large programs goes there)."""
    if request.config.option.markexpr != "not e2e":
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process in the fast tier; mark "
                             "it @pytest.mark.e2e")

    monkeypatch.setattr(subprocess, "Popen", refuse)

def run_on_one_device(code: str, *args: str, timeout: int = 600) -> str:
    """stdout of `python -c code args` in its own process on one CPU device (tests/ importable).

    For a test's long training run: one device has no cross-device all-reduce, which on 8
    simulated devices starved of CPU by the other test worker was seen to hang or abort
    XLA:CPU's rendezvous (and with it the whole xdist worker)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if "device_count" not in f)
    env = dict(os.environ, JAX_PLATFORMS="cpu", GPT_JAX_TEST_DEVICES="1", XLA_FLAGS=xla_flags,
               PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


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


def init_sharded(model, rng, mesh, rules):
    """(params, shardings) of a GPT module, every leaf born sharded on `mesh` (the way
    `Trainer.init_state` initialises params)."""
    import jax

    from gpt_jax import model as model_lib
    from gpt_jax import sharding

    shardings = sharding.param_shardings(model.cfg, mesh, rules)
    with sharding.activate(mesh, rules):
        params = jax.jit(lambda r: model_lib.init_params(model, r), out_shardings=shardings)(rng)
    return params, shardings
