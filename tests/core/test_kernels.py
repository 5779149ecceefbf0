"""The pinned CPU kernels (qg.core.kernels): what `pin` sets, that `import qg` first pins this
process's torch, and that the provenance of every results file says which kernels and how many
threads made its floats."""

import os
import subprocess
import sys

from qg.config.profiles import load_profile
from qg.core import kernels
from qg.core.report import provenance

PROBE = (
    "import qg, torch, os; "
    "print(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'))"
)


def _probe(env: dict) -> str:
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()


def test_pin_sets_what_is_unset_and_keeps_what_is_set():
    env = {"MKL_CBWR": "COMPATIBLE"}
    # whether *this* process sees it depends on its import order
    assert kernels.pin(env) in (True, False)
    assert env == {**kernels.PINNED, "MKL_CBWR": "COMPATIBLE"}


def test_native_kernels_opt_out_sets_nothing():
    env = {"QG_NATIVE_KERNELS": "1"}
    assert kernels.pin(env) is False
    assert env == {"QG_NATIVE_KERNELS": "1"}


def test_import_qg_first_pins_torch():
    env = {
        k: v for k, v in os.environ.items() if k not in kernels.PINNED and k != "QG_NATIVE_KERNELS"
    }
    assert _probe(env) == ["AVX2", "AVX2,STRICT"]
    native = _probe({**env, "QG_NATIVE_KERNELS": "1"})
    assert native[1] == "None"  # MKL left to pick the machine's own path


def test_provenance_records_kernels_and_threads():
    prov = provenance(load_profile("smoke"), "abc")
    described = prov["kernels"]
    assert set(described) == {"cpu", "threads", "aten_capability", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA"}
    assert isinstance(described["threads"], int) and described["threads"] >= 1


def test_fingerprint_is_a_digest_per_primitive_and_repeats_in_a_process():
    """Same seed, same process: the same digests (the comparison across machines or settings is by
    hand); another seed changes every one, so a digest says something about its op's output."""
    a, b, other = kernels.fingerprint(), kernels.fingerprint(), kernels.fingerprint(seed=1)
    assert a == b and set(a) >= {"linear", "attention (sdpa)", "layer_norm", "adamw"}
    assert all(len(v) == 12 for v in a.values()) and all(a[k] != other[k] for k in a)


def test_kernels_cli_prints_the_kernels_and_the_fingerprint():
    out = subprocess.run(
        [sys.executable, "-m", "qg.core.kernels"], capture_output=True, text=True, check=True
    ).stdout
    assert '"kernels"' in out and '"attention (sdpa)"' in out
