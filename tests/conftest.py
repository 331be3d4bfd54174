"""Test set-up: 8 emulated CPU devices, and the gpu / tpu markers skip elsewhere.

The device count must be fixed before JAX initialises its backends, so it is set here, at import
time of the first conftest, ahead of any test module importing jax.numpy.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def _platform() -> str:
  return jax.devices()[0].platform


def pytest_collection_modifyitems(config, items):
  platform = _platform()
  for item in items:
    if "gpu" in item.keywords and platform != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    if "tpu" in item.keywords and platform != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
