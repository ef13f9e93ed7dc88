"""Shared fixtures. The tests run on the CPU; the mesh tests start their own subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before JAX starts)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py, tests/hf_models.py


@pytest.fixture(scope="session")
def v1_tokenizer_path():
    from mistral_jax.tokenizer import mistral_common_tokenizer

    return mistral_common_tokenizer("v1")


@pytest.fixture(scope="session")
def v3_tokenizer_path():
    from mistral_jax.tokenizer import mistral_common_tokenizer

    return mistral_common_tokenizer("v3")
