"""requirements/lock.txt pins every requirement of setup.cfg (with the dev and tpu extras)."""

from __future__ import annotations

import importlib.util
import pathlib

from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _freeze_module():
    spec = importlib.util.spec_from_file_location("freeze", ROOT / "requirements" / "freeze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_pins_every_requirement_inside_its_range():
    freeze = _freeze_module()
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for req in freeze.top_level(["dev", "tpu"]):
        if not freeze.applies(req, ""):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements/lock.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    assert "gpt-jax" not in pins and "gpt_jax" not in pins
