"""Launchers: Cloud TPU VMs (`tpu.py`), simulated hosts on this machine (`local_multihost.py`)."""
