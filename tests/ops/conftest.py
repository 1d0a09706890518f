"""Fixtures of the native-ops tests: the loaded library (or a skip) and the devices to run on."""
from __future__ import annotations

import pytest
import torch


def _load_native():
    try:
        from megads.ops import native

        native.load()
        return native, None
    except Exception as e:  # reported by test_native_library_is_built
        return None, e


NATIVE, NATIVE_ERROR = _load_native()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def native():
    if NATIVE is None:
        pytest.skip(f"native ops not built ({NATIVE_ERROR})")
    return NATIVE


@pytest.fixture(params=DEVICES)
def device(request, native):
    if request.param == "cuda" and not native.has_kernels("cuda"):
        pytest.skip("the native library was built without CUDA kernels")
    return torch.device(request.param)
