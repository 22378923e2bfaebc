"""Session hooks: a test marked `cuda` (pyproject's markers) is skipped where no CUDA device is,
so a test file needs the marker alone."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
