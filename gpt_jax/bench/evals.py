"""`gpt-jax bench evals`: examples/s of evaluation (gpt_jax.evals), on CPU and projected for TPU.

Random-init params of the config (default: GPT-2 124M) score synthetic 4-ending examples
(context 30-60 tokens, endings 10-30: rows of HellaSwag's size) on the local devices; the
first batch compiles and is timed apart. With `--bench_tpu=v5e-8` the scoring batch is also
compiled for that TPU slice on this host (libtpu, no TPU needed) and XLA's cost model projects
the time for HellaSwag's 10,042 validation examples at `--bench_tpu_rows` rows per batch.

`--bench_generate=N` times a generative task (greedy answers cut at a stop string) on a
trained run, in turns: through the serving engine (what `gpt-jax eval` uses: continuous
batching, a slot freed as soon as its answer stops) and through static batches of the same
rows, each run until its longest answer is done (the best a static batch can do: it is told
each batch's longest answer, as if it stopped on the device). Both are compiled first.

`--bench_core=BUNDLE --bench_tpu=v5e-8` projects CORE (gpt_jax.evals.core) on the slice: each
task of the bundle is rendered and tokenized (`--bench_tokenizer`: a folder with GPT-2's
vocab.json and merges.txt) into the rows its one scoring call packs, at the power-of-two length
of its longest row, and each length's [rows, length] batch is compiled for the slice.
"""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax import aot, sharding
from gpt_jax.commands.common import define_config_flag, usage_error
from gpt_jax.config import typed
from gpt_jax.evals import generative
from gpt_jax.evals.scoring import Request, loglikelihoods, score_fn
from gpt_jax.evals.tasks import load_task, load_tasks
from gpt_jax.flops import count_params
from gpt_jax.hardware import peak_flops
from gpt_jax.model import GPT
from gpt_jax.step import Trainer

if "config" not in flags.FLAGS:
    define_config_flag("gpt2_124m")
flags.DEFINE_integer("bench_examples", 16, "Examples (4 rows each) timed after the compile "
                     "(0: skip the local measurement).")
flags.DEFINE_integer("bench_rows", 16, "Rows per scoring batch on the local devices.")
flags.DEFINE_string("bench_tpu", "", "Also project for this TPU slice, e.g. v5e-8 ('': skip).")
flags.DEFINE_integer("bench_tpu_rows", 256, "Rows per batch for the TPU projection.")
flags.DEFINE_integer("bench_tpu_length", 128, "Padded row length for the TPU projection.")
flags.DEFINE_integer("bench_generate", 0, "Also time this many examples of a generative task "
                     "through the serving engine and through static batches (0: skip).")
flags.DEFINE_string("bench_run", "runs/demo", "The trained run --bench_generate loads (`make "
                    "train` writes runs/demo).")
flags.DEFINE_string("bench_task", "", "A generate task (JSONL, options after '?') for "
                    "--bench_generate; '': the next line after 6 lines of the run's validation "
                    "text, up to the newline.")
flags.DEFINE_integer("bench_slots", 16, "--bench_generate: the engine's slots, and the rows of "
                     "a static batch.")
flags.DEFINE_integer("bench_rounds", 5, "--bench_generate: timed runs of each system, in "
                     "turns (the medians are reported).")
flags.DEFINE_string("bench_core", "", "With --bench_tpu: project CORE on this bundle (a "
                    "folder laid out as for --tasks=core:BUNDLE).")
flags.DEFINE_string("bench_tokenizer", "", "--bench_core: a folder with the model's GPT-2 BPE "
                    "(vocab.json + merges.txt).")
flags.DEFINE_string("bench_evals_json", "", "Also write the results to this JSON file.")
FLAGS = flags.FLAGS

HELLASWAG_VAL = 10_042


def synthetic_requests(n_examples: int, vocab: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_examples):
        context = rng.integers(0, vocab, int(rng.integers(30, 61))).tolist()
        out += [Request(context, rng.integers(0, vocab, int(rng.integers(10, 31))).tolist())
                for _ in range(4)]
    return out


def measure_local(config, n_examples: int, rows: int) -> dict:
    cfg = typed(config).model
    params = jax.jit(GPT(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    requests = synthetic_requests(n_examples + rows // 4, cfg.vocab_size)
    start = time.perf_counter()
    loglikelihoods(cfg, params, requests[:rows], batch_rows=rows)  # compiles
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    loglikelihoods(cfg, params, requests[rows:], batch_rows=rows)
    seconds = time.perf_counter() - start
    return {"device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "examples": n_examples, "rows_per_batch": rows, "first_batch_s": compile_s,
            "seconds": seconds, "examples_per_s": n_examples / seconds}


def project_tpu(config, slice_name: str, rows: int, length: int) -> dict:
    """XLA's estimated time of one [rows, length] scoring batch on the slice, and of HellaSwag."""
    tpu = aot.get_slice(slice_name)
    devices = aot.topology_devices(tpu)
    config = typed(config).replace({"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1})

    def compile_for(cfg_probe):
        mesh = aot.topology_mesh(cfg_probe.mesh, devices)
        trainer = Trainer.for_config(cfg_probe, mesh)
        params = trainer.abstract_state()["params"]
        batch = jax.ShapeDtypeStruct((rows, length), jnp.int32,
                                     sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
        mask = jax.ShapeDtypeStruct((rows, length), jnp.float32, sharding=batch.sharding)
        with sharding.activate(mesh, trainer.rules):
            return score_fn(mesh).lower(params, batch, batch, mask,
                                        model_cfg=trainer.model_cfg).compile()

    compiled = compile_for(config)
    cfg = config.model
    scanned = cfg.scan_layers
    cost = (aot.layer_extrapolated_cost(config, compile_for)[0] if scanned
            else aot.xla_cost(compiled))
    model_flops = 2 * count_params(cfg) * rows * length / len(devices)  # forward only
    report = aot.cost_report(cost, model_flops, peak_flops(devices[0].device_kind),
                             tpu.hbm_bytes_per_s)
    step_s = report["xla_estimated_step_s"]
    batches = math.ceil(HELLASWAG_VAL * 4 / rows)
    return {"topology": tpu.name, "rows_per_batch": rows, "length": length,
            "estimate_source": report["estimate_source"], "batch_s": step_s,
            "hellaswag_batches": batches, "hellaswag_s": batches * step_s if step_s else None,
            "examples_per_s": rows / 4 / step_s if step_s else None}


def generate_task(spec: str, n: int, config) -> tuple[list, generative.Options]:
    """The examples and options of --bench_task, or next lines of the run's validation text."""
    if spec:
        task = load_tasks(f"generate:{spec}", limit=n)[0]
        return list(task.examples), task.options
    examples = load_task("nextline", "", limit=n, config=config)
    o = generative.Options(max_tokens=min(64, config.model.block_size // 2))
    return [generative.GenExample(e.context + "\n", (e.endings[e.label],), e.source)
            for e in examples], o


def measure_generate(run_dir: str, spec: str, n: int, slots: int, rounds: int) -> dict:
    """Examples/s of the task through the engine and through static batches, in turns
    (`rounds` of each; medians), both compiled first."""
    from gpt_jax import api
    from gpt_jax.bench.static_sampler import static_generate

    lm = api.load(run_dir, slots=slots)
    examples, o = generate_task(spec, n, lm.config)
    tok, cfg, engine = lm.tokenizer, lm.model_cfg, lm.engine
    references = [e.references for e in examples]
    warm_up_s = engine.warm_up()
    compiled = engine.compilations()
    generative.score(["a"], [["a"]])  # imports the scorers' libraries outside the timing
    served = generative.evaluate(engine, tok, examples, o)

    ids = generative.prompt_ids(tok, examples, o, cfg.block_size)
    batches = [range(i, min(i + slots, len(ids))) for i in range(0, len(ids), slots)]
    longest = [max(served["answer_tokens"][i] for i in b) for b in batches]
    eos = int(getattr(tok, "eos_id", -1))

    def static_run() -> tuple[list[str], dict]:
        answers = []
        for b, new in zip(batches, longest):
            for out in static_generate(cfg, lm.params, [ids[i] for i in b], new, eos_id=eos):
                text = tok.decode([t for t in out if t != eos])
                cuts = [text.index(s) for s in o.stop if s in text]
                answers.append(text[:min(cuts)] if cuts else text)
        return answers, generative.score(answers, references)

    answers, static_scores = static_run()  # compiles every shape
    seconds: dict[str, list[float]] = {"engine": [], "static": []}
    for _ in range(rounds):
        for system, call in (("engine", lambda: generative.evaluate(engine, tok, examples, o)),
                             ("static", static_run)):
            start = time.perf_counter()
            call()
            seconds[system].append(time.perf_counter() - start)
    tokens = served["answer_tokens"]
    engine_s, static_s = (float(np.median(seconds[k])) for k in ("engine", "static"))
    return {"run": run_dir, "task": spec or "next line of the validation text",
            "examples": len(examples), "slots": slots, "max_tokens": o.max_tokens,
            "rounds": rounds, "answer_tokens_mean": float(np.mean(tokens)),
            "answer_tokens_max": max(tokens), "engine_tokens_decoded": sum(tokens),
            "static_tokens_decoded": sum(n * len(b) for b, n in zip(batches, longest)),
            "engine_warm_up_s": warm_up_s, "engine_compilations": compiled,
            "engine_compilations_after": engine.compilations(), "seconds": seconds,
            "engine_s": engine_s, "static_s": static_s,
            "engine_examples_per_s": len(examples) / engine_s,
            "static_examples_per_s": len(examples) / static_s,
            "same_answers": sum(a == b for a, b in zip(answers, served["predictions"])),
            "engine_exact_match": served["exact_match"],
            "static_exact_match": static_scores["exact_match"]}


def core_shapes(config, bundle: str, tokenizer) -> list[dict]:
    """Per task of the CORE bundle: its lines, the rows its scoring call packs, and their
    padded length (the bucket of the longest row, at most block_size)."""
    from gpt_jax.evals import core
    from gpt_jax.serve.engine import bucket

    block, out = typed(config).model.block_size, []
    for task in core.load_bundle(bundle):
        rows = [r for i in range(len(task.items)) for r in core.requests(task, i, tokenizer)]
        lengths = [min(len(c) + len(x), block + 1) - 1 for c, x in rows]
        out.append({"task": task.label, "kind": task.kind, "shots": task.shots,
                    "lines": len(task.items), "rows": len(rows),
                    "length": bucket(max(lengths), block), "tokens": int(sum(lengths)),
                    "rows_cut": int(sum(len(c) + len(x) > block + 1 for c, x in rows))})
    return out


def project_core(config, slice_name: str, bundle: str, tokenizer, rows: int) -> dict:
    """XLA's estimated time to score every CORE task of `bundle` on the slice."""
    tasks = core_shapes(config, bundle, tokenizer)
    batch_s = {L: project_tpu(config, slice_name, rows, L)["batch_s"]
               for L in sorted({t["length"] for t in tasks})}
    for t in tasks:
        t["batches"] = math.ceil(t["rows"] / rows)
        t["seconds"] = t["batches"] * batch_s[t["length"]]
    return {"topology": slice_name, "rows_per_batch": rows, "batch_s_by_length": batch_s,
            "tasks": tasks, "rows": sum(t["rows"] for t in tasks),
            "batches": sum(t["batches"] for t in tasks),
            "seconds": sum(t["seconds"] for t in tasks)}


def run(argv: list[str]) -> None:
    del argv
    config, results = FLAGS.config, {}
    print(f"# scorer: {config.model.n_layer} layers, width {config.model.n_embd}, "
          f"{config.model.dtype}")
    if FLAGS.bench_examples:
        r = results["local"] = measure_local(config, FLAGS.bench_examples, FLAGS.bench_rows)
        print(f"{r['device']} x{r['devices']}: {r['examples']} examples ({r['rows_per_batch']} "
              f"rows per batch): {r['seconds']:.2f} s, {r['examples_per_s']:.2f} examples/s "
              f"(first batch, with compile: {r['first_batch_s']:.1f} s)")
    if FLAGS.bench_tpu:
        p = project_tpu(config, FLAGS.bench_tpu, FLAGS.bench_tpu_rows, FLAGS.bench_tpu_length)
        results["tpu"] = p
        print(f"{p['topology']} (XLA cost model, {p['estimate_source']}): "
              f"[{p['rows_per_batch']}, {p['length']}] batch {p['batch_s'] * 1e3:.2f} ms; "
              f"HellaSwag val ({HELLASWAG_VAL} examples, {p['hellaswag_batches']} batches): "
              f"{p['hellaswag_s']:.2f} s ({p['examples_per_s']:,.0f} examples/s)")
    if FLAGS.bench_core:
        if not FLAGS.bench_tpu or not FLAGS.bench_tokenizer:
            raise usage_error("--bench_core needs --bench_tpu (the slice to project for) and "
                              "--bench_tokenizer (a folder with vocab.json and merges.txt)")
        from gpt_jax.data.gpt2_bpe import load_dir
        c = results["core"] = project_core(config, FLAGS.bench_tpu, FLAGS.bench_core,
                                           load_dir(FLAGS.bench_tokenizer), FLAGS.bench_tpu_rows)
        for t in c["tasks"]:
            print(f"  {t['task']}: {t['lines']} lines, {t['rows']} rows at {t['length']} "
                  f"({t['rows_cut']} cut to the context), {t['batches']} batches, "
                  f"{t['seconds']:.2f} s")
        print(f"CORE on {c['topology']} (XLA cost model): {len(c['tasks'])} tasks, "
              f"{c['rows']:,} rows in {c['batches']} batches of {c['rows_per_batch']}: "
              f"{c['seconds']:.1f} s")
    if FLAGS.bench_generate:
        g = results["generate"] = measure_generate(FLAGS.bench_run, FLAGS.bench_task,
                                                   FLAGS.bench_generate, FLAGS.bench_slots,
                                                   FLAGS.bench_rounds)
        print(f"generate ({g['task']}, {g['examples']} examples, answers "
              f"{g['answer_tokens_mean']:.1f} tokens on average, at most {g['max_tokens']}): "
              f"engine ({g['slots']} slots) {g['engine_examples_per_s']:.2f} examples/s, "
              f"static batches of {g['slots']} {g['static_examples_per_s']:.2f} examples/s "
              f"({g['engine_examples_per_s'] / g['static_examples_per_s']:.2f}x; medians of "
              f"{g['rounds']}); tokens decoded {g['engine_tokens_decoded']:,} / "
              f"{g['static_tokens_decoded']:,}; "
              f"{g['same_answers']}/{g['examples']} answers the same; exact match "
              f"{g['engine_exact_match']:.3f} / {g['static_exact_match']:.3f}")
    if FLAGS.bench_evals_json:
        with open(FLAGS.bench_evals_json, "w") as f:
            json.dump(results, f, indent=2)
