"""`gpt-jax serve --workdir=runs/demo [--port=8000 --slots=8 ...]`: an OpenAI-compatible server.

Serves the run's latest checkpoint (a run directory, one checkpoint step, or a gs:// run) at
`/v1/completions`, `/v1/chat/completions` (with the run's chat template), the 0.x client's
`/v1/engines/<model>/completions`, `/v1/models`, `/health` and `/metrics`, with continuous
batching over `--slots` decode slots. Binds 127.0.0.1 unless --host says otherwise; with
--api_key (or GPT_JAX_API_KEY) every route but /health wants `Authorization: Bearer <key>`.
SIGTERM or Ctrl-C stops admitting, gives in-flight requests --shutdown_s, then exits 0.
See docs/serving.md.
"""

from __future__ import annotations

import os
import sys

from absl import flags

flags.DEFINE_string("workdir", None, "A run directory, a checkpoint step, or a gs:// run.",
                    required=True)
flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535)
flags.DEFINE_integer("slots", 8, "Decode slots: requests (choices) generated at once.",
                     lower_bound=1)
flags.DEFINE_integer("max_queue", 256, "Requests that may wait for a slot; more get 429.",
                     lower_bound=1)
flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer <key>` (default: "
                    "$GPT_JAX_API_KEY; unset: no key).")
flags.DEFINE_string("served_model_name", None, "The model name clients send (default: the "
                    "run directory's name); more names after commas are accepted too (e.g. "
                    "text-davinci-002 for an old client's code, unchanged).")
flags.DEFINE_integer("max_tokens_cap", 4096, "The largest max_tokens a request may ask for.",
                     lower_bound=1)
flags.DEFINE_integer("max_n", 8, "The largest n a request may ask for.", lower_bound=1)
flags.DEFINE_integer("max_body_kb", 1024, "The largest request body, in KiB.", lower_bound=1)
flags.DEFINE_float("shutdown_s", 30.0, "On SIGTERM, how long in-flight requests may run.",
                   lower_bound=0.0)
flags.DEFINE_bool("batch_invariant", False, "Run every decode step over all slots, so that a "
                  "request's log-probs are bitwise the same whatever runs beside it (slower "
                  "when few slots are busy).")
flags.DEFINE_bool("shard", False, "Shard params and cache over all devices with the run's "
                  "mesh config (slots over the batch axes, heads over tensor).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    # Imported here, not at the top: --help stays fast.
    import jax

    from gpt_jax import api
    from gpt_jax.run import tokenizer_home
    from gpt_jax.serve import http
    from gpt_jax.serve.chat import load_template
    from gpt_jax.serve.engine import Engine, EngineConfig

    lm = api.load(FLAGS.workdir, shard=FLAGS.shard)
    engine = Engine(lm.model_cfg, lm.params, lm.tokenizer,
                    EngineConfig(slots=FLAGS.slots, max_queue=FLAGS.max_queue,
                                 batch_invariant=FLAGS.batch_invariant,
                                 prefill_rows=1),  # it admits one request per step
                    lm.mesh, lm.rules)
    names = (FLAGS.served_model_name or os.path.basename(os.path.normpath(FLAGS.workdir)))
    name, *aliases = [n.strip() for n in names.split(",") if n.strip()]
    key = FLAGS.api_key if FLAGS.api_key is not None else os.environ.get("GPT_JAX_API_KEY", "")
    config = http.ServerConfig(model_name=name, aliases=tuple(aliases), api_key=key, max_tokens_cap=FLAGS.max_tokens_cap,
                               max_n=FLAGS.max_n, max_body_bytes=FLAGS.max_body_kb * 1024)
    template = load_template(tokenizer_home(FLAGS.workdir))
    server = http.Server(engine, lm.tokenizer, template, config)
    mesh = dict(lm.mesh.shape) if lm.mesh is not None else "one device"
    print(f"serving {name!r} ({lm.model_cfg.n_layer} layers, width {lm.model_cfg.n_embd}, "
          f"context {lm.model_cfg.block_size}) on {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, mesh {mesh}, {FLAGS.slots} slots, chat template "
          f"{'yes' if template else 'none'}; http://{FLAGS.host}:{FLAGS.port}/v1 "
          f"(warming up)", flush=True)
    http.run(server, FLAGS.host, FLAGS.port, shutdown_deadline_s=FLAGS.shutdown_s,
             on_ready=lambda line: print(line, flush=True))
    print("stopped", flush=True)
    sys.stdout.flush()
