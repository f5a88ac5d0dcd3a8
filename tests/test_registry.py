"""Dispatch as a user sees it: which impl a call runs, and why the others are unavailable."""

from __future__ import annotations

import pytest
import torch

import fgpo_kernels as fk


def test_resolve_impl_names_what_a_call_runs(monkeypatch):
    monkeypatch.delenv("FGPO_IMPL", raising=False)
    assert fk.resolve_impl(None, "cpu") == "torch"  # CPU tensors: the chunked PyTorch impl
    assert fk.resolve_impl("reference", "cpu") == "reference"
    monkeypatch.setenv("FGPO_IMPL", "triton")  # the interpreter is on in the tests
    assert fk.resolve_impl(None, "cpu") == "triton"
    assert fk.resolve_impl("torch", "cpu") == "torch"  # an explicit impl wins over FGPO_IMPL
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="impl 'cuda' is unavailable"):
            fk.resolve_impl("cuda", "cpu")


def test_fgpo_example_names_the_impl_it_runs(capsys):
    from fgpo.cli import main

    assert main(["example", "--rows", "33", "--hidden", "16", "--vocab", "101"]) == 0
    out = capsys.readouterr().out
    assert "impl: torch, chosen automatically" in out
    assert "impl=torch" in out and "impl=reference" in out
