"""`swapped`: what it sets holds for the block, and afterwards every owner is as it was, even on error."""

import pytest
import torch

from cvg.models.patching import swapped


class Owner:
    def method(self):
        return "class"


def test_swaps_are_restored_after_an_error():
    owner, param = Owner(), torch.nn.Parameter(torch.zeros(1))
    owner.value = 1
    with (
        pytest.raises(RuntimeError),
        swapped([(owner, "value", 2), (owner, "method", lambda: "patched"), (param, "requires_grad", False)]),
    ):
        assert (owner.value, owner.method(), param.requires_grad) == (2, "patched", False)
        raise RuntimeError
    assert owner.value == 1 and owner.method() == "class" and "method" not in vars(owner)
    assert param.requires_grad


def test_an_attribute_the_owner_lacked_is_removed_again():
    owner = Owner()
    with swapped([(owner, "added", 3)]):
        assert owner.added == 3
    assert not hasattr(owner, "added")


def test_a_failing_swap_undoes_the_earlier_ones():
    owner, module = Owner(), torch.nn.Linear(1, 1)
    owner.value = 1
    with pytest.raises(TypeError), swapped([(owner, "value", 2), (module, "weight", "not a parameter")]):
        pass
    assert owner.value == 1 and isinstance(module.weight, torch.nn.Parameter)
