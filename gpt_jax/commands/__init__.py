"""One module per `gpt-jax` command; each defines its absl flags and a `main(argv)`."""
