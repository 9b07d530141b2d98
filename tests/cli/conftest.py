"""The CLI sizes torch's thread pools (``--threads``); commands run in this process under CliRunner, so every
test gets the session's setting back."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
