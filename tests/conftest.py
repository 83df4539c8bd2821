"""Shared test set-up: offline, deterministic, CPU, few threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module whose training tests share the 2 cores with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pretrained_corpus(tmp_path_factory):
    """The synthetic corpus and a short real pretraining run on it (tests/downstream.py), shared by the finetuning
    and VideoQA tests."""
    from downstream import make_pretrained_corpus

    return make_pretrained_corpus(tmp_path_factory.mktemp("downstream"))
