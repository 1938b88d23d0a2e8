"""Published measured TPU training runs rebuilt as configs: each module names its source, what it
states and assumes, and MEASURED_TOKENS_PER_S_PER_CHIP; `gpt-jax aot --published` compiles them
and fits gpt_jax/projection.py's efficiencies to them."""
