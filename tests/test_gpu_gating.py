"""`gpu` tests without CUDA: skipped, deselected by default, and failed when CUDA was asked for
(`-m gpu`, or D3S_REQUIRE_GPU=1). The project's conftest runs in a pytester session with
torch.cuda.is_available() forced to False, so this holds on a machine with a GPU too."""

from pathlib import Path

import pytest
import torch

from .conftest import REQUIRE_ENV, markexpr_selects

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
INI = "[pytest]\nmarkers =\n    gpu: needs CUDA\n    slow: slow\n"
TESTS = """
import pytest

@pytest.mark.gpu
def test_on_gpu():
    pass

def test_plain():
    pass
"""


@pytest.fixture
def no_cuda(pytester, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini(INI)
    pytester.makepyfile(test_tiny=TESTS)
    return pytester


def test_requested_gpu_tests_fail_without_cuda(no_cuda):
    result = no_cuda.runpytest("-m", "gpu", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)  # failed in setup, before any fixture; not skipped
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*CUDA was requested (-m 'gpu')*is_available() is False*"])


def test_env_requires_gpu_tests(no_cuda, monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "1")
    result = no_cuda.runpytest("-m", "", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*CUDA was requested ({REQUIRE_ENV}=1)*"])


def test_unrequested_gpu_tests_skip_without_cuda(no_cuda):
    result = no_cuda.runpytest("-m", "", "-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*needs CUDA*"])


def test_default_run_deselects_gpu_tests(no_cuda):
    result = no_cuda.runpytest("-m", "not slow and not gpu", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=1)


@pytest.mark.parametrize(
    ("expr", "asks"),
    [
        ("gpu", True),
        ("gpu or slow", True),
        ("slow and gpu", True),
        ("(gpu)", True),
        ("", False),
        ("not gpu", False),
        ("not slow and not gpu", False),
        ("not slow", False),
        ("not (slow or gpu)", False),
        ("gpugpu", False),
    ],
)
def test_markexpr_selects(expr, asks):
    assert markexpr_selects(expr) is asks
