"""The host allocator setting (sats/allocator.py): what it calls, its errors, and the page faults it saves."""

import json
import os
import platform
import subprocess
import sys

import pytest

from sats import allocator
from sats.config import ConfigError


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not tuned yet, on glibc, with the C library replaced by a recorder."""
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Linux")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delenv(allocator.ENV, raising=False)
    return libc


def test_tuned_by_default_once_per_process(fresh):
    state = allocator.tune_host_allocator()
    assert fresh.calls == [(allocator.M_MMAP_MAX, 0), (allocator.M_TRIM_THRESHOLD, -1)]
    assert "large blocks reused" in state
    assert allocator.tune_host_allocator() == state and len(fresh.calls) == 2  # applied once


def test_system_keeps_the_defaults(fresh, monkeypatch):
    monkeypatch.setenv(allocator.ENV, "System")
    assert "defaults" in allocator.tune_host_allocator() and fresh.calls == []


def test_other_c_libraries_are_left_alone(fresh, monkeypatch):
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert "Darwin" in allocator.tune_host_allocator() and fresh.calls == []


def test_a_refused_mallopt_is_reported(fresh):
    fresh.answer = 0
    state = allocator.tune_host_allocator()
    assert "refused" in state and "M_MMAP_MAX" in state and "M_TRIM_THRESHOLD" in state


def test_a_misspelt_setting_is_a_config_error(fresh, monkeypatch):
    monkeypatch.setenv(allocator.ENV, "tunned")
    with pytest.raises(ConfigError, match="SATS_HOST_ALLOCATOR='tunned' is not one of"):
        allocator.tune_host_allocator()
    assert fresh.calls == []


PROBE = """
import json, random, resource, torch
from sats.allocator import tune_host_allocator
state = tune_host_allocator()
rng, mib = random.Random(0), 2**20 // 4
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # an iteration's pattern: 4 live and 6 temporary tensors of 1-60 MiB
    live = [torch.empty(rng.randint(5, 60) * mib).fill_(1.0) for _ in range(4)]
    for _ in range(6):
        torch.empty(rng.randint(1, 60) * mib).fill_(1.0)
    del live
print(json.dumps({"state": state, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_tensors_reuse_their_pages_only_when_tuned():
    """10 rounds of ~1.2 GiB of large tensors (~300 k pages): the defaults fault nearly every page of every tensor
    in; tuned, the heap's freed blocks are written again without faulting."""
    def run(setting: str) -> dict:
        env = {**os.environ, allocator.ENV: setting}
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    system, tuned = run("system"), run("tuned")
    assert "defaults" in system["state"] and "large blocks reused" in tuned["state"]
    assert system["faults"] > 200_000 and tuned["faults"] < system["faults"] / 4
