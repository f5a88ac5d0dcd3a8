"""Test set-up: Triton's interpreter on machines without a GPU, seeding, and the fixtures the
data and trainer tests share (a private model cache, the tiny LLaVA, a small preference set).

Shared assertions (``rel_err``, ``compare``) live in ``helpers.py``; trainer configs and run
readers in ``train_helpers.py``."""

from __future__ import annotations

import os
import zlib

import torch

# Must happen before anything imports triton. On a GPU machine the real compiler is used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    import triton_interp_patch  # bf16 tl.dot in the CPU interpreter (test-only fix)

    triton_interp_patch.install()

import pytest

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed(request):
    # A reproducible seed per test, derived from its id (so inputs differ across tests);
    # FGPO_TEST_SEED=k draws another set of inputs for every test.
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("FGPO_TEST_SEED", "0"))
    torch.manual_seed(seed)
    yield


@pytest.fixture(scope="module")
def train_env(tmp_path_factory):
    """A private ``FGPO_CACHE`` (tiny models, generated data) and one torch thread (tiny models
    are fastest on one thread of a shared machine); both restored afterwards."""
    old = os.environ.get("FGPO_CACHE"), torch.get_num_threads()
    os.environ["FGPO_CACHE"] = str(tmp_path_factory.getbasetemp() / "fgpo_cache")
    torch.set_num_threads(1)
    yield os.environ["FGPO_CACHE"]
    if old[0] is None:
        os.environ.pop("FGPO_CACHE", None)
    else:
        os.environ["FGPO_CACHE"] = old[0]
    torch.set_num_threads(old[1])


@pytest.fixture(scope="session")
def llava():
    """The tiny LLaVA and its processor, built in memory (callers deep-copy before training)."""
    from fgpo.models import tiny

    return tiny.build_tiny("tiny-llava")


@pytest.fixture(scope="session")
def prefs(tmp_path_factory):
    """16 generated preference records (half with a corrupted image); the JSON path."""
    from fgpo.pairs.synthetic import make_preference_set

    return make_preference_set(str(tmp_path_factory.mktemp("prefs")), n=16, seed=3)
