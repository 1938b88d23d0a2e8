"""Benchmarks behind `gpt-jax bench <kind>`: one module per kind, each with `run(argv)`."""

KINDS = {
    "train": "step time, tokens/s, TFLOP/s and MFU of a training step",
    "sample": "tokens/s of the KV-cached sampler against a no-cache baseline",
    "data": "loader throughput in tokens/s and the default corpus's store build time",
    "prepare": "tokenization MB/s of `prepare` per tokenizer, worker count and corpus size",
    "serve": "output tok/s, req/s, TTFT and inter-token latency of `gpt-jax serve` against "
             "static batches and `transformers serve` at several concurrencies",
    "evals": "examples/s of the multiple-choice scorer, a generative task through the engine "
             "vs static batches (--bench_generate), and TPU projections (--bench_tpu, "
             "--bench_core)",
}
