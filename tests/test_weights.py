"""models/weights.py: the one strict loader (every problem in one error, nothing copied on failure)
and the alias-free state that checkpoints are written from."""

import pytest
import torch
from torch import nn

from vlmkit.errors import CheckpointError
from vlmkit.models.weights import distinct_names, load_state, state_to_save, uninitialised


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def test_every_problem_in_one_error_and_nothing_copied():
    torch.manual_seed(0)
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = {k: torch.full_like(v, 7.0) for k, v in net.state_dict().items()}
    del state["1.bias"]                      # missing
    state["2.weight"] = torch.zeros(1)       # unexpected
    state["0.weight"] = torch.zeros(5, 3)    # mis-shaped
    with pytest.raises(CheckpointError) as err:
        load_state(net, state, "ckpt/model.safetensors")
    msg = str(err.value)
    assert msg.startswith("cannot load ckpt/model.safetensors: ")
    assert "missing tensors (1): ['1.bias']" in msg
    assert "unexpected tensors (1): ['2.weight']" in msg
    assert "shape mismatches (1): ['0.weight (5, 3) vs (4, 3)']" in msg
    for name, t in net.state_dict().items():  # the tensors that did fit were not copied either
        assert torch.equal(t, before[name]), name


def test_renamed_tensors_are_reported_under_both_names():
    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["1.weight"] = torch.ones(5)
    state["9.weight"] = torch.ones(1)
    with pytest.raises(CheckpointError) as err:
        load_state(net, state, "hf", unmatched=["stray"],
                   source_names={"1.weight": "norm.weight", "9.weight": "extra.weight"})
    msg = str(err.value)
    assert "unexpected tensors (2): ['stray', 'extra.weight -> 9.weight (no such parameter)']" in msg
    assert "norm.weight (5,) -> 1.weight (4,)" in msg


def test_a_loaded_state_is_copied_with_its_values_and_the_module_dtype():
    net = _net()
    state = {k: torch.randn_like(v).to(torch.bfloat16) for k, v in net.state_dict().items()}
    load_state(net, state, "x")
    for name, t in net.state_dict().items():
        assert t.dtype == torch.float32 and torch.equal(t, state[name].float()), name


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        self.b.weight = self.a.weight  # one storage under two names


def test_aliases_are_saved_once_and_filled_on_load():
    model = _Tied()
    assert distinct_names(model) == ["a.weight"]
    saved = state_to_save(model)
    assert list(saved) == ["a.weight"] and saved["a.weight"].is_contiguous()
    again = _Tied()
    load_state(again, saved, "x")
    assert torch.equal(again.b.weight, model.a.weight)


def test_uninitialised_allocates_without_running_init_and_zeroes_unsaved_buffers():
    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3, 2))
            self.register_buffer("saved", torch.ones(2))
            self.register_buffer("scratch", torch.ones(4), persistent=False)

    probe = uninitialised(Probe)
    assert probe.weight.device.type == "cpu" and probe.weight.shape == (3, 2)
    assert probe.scratch.eq(0).all()  # built on the meta device, then zeroed: not __init__'s ones
    assert set(probe.state_dict()) == {"weight", "saved"}
    load_state(probe, {"weight": torch.full((3, 2), 2.0), "saved": torch.full((2,), 3.0)}, "probe")
    assert probe.weight.eq(2).all() and probe.saved.eq(3).all()
