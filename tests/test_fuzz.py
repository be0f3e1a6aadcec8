"""Issue 17: a quick fuzz run (about a minute on 2 cores; the long one is ``benchmarks/fuzz/run.py``).

hypothesis mutates valid NIfTI (.nii, .nii.gz), NRRD (attached and detached header), MHA, npy, DICOM
series, manifest CSV, task.json, plugin.json and plugin.safetensors files (bit flips, bytes, header
integers set to 0/-1/huge, truncation, insertion, deletion, CSV/JSON tokens replaced, lines dropped
or doubled) and feeds them to ``read_volume``, ``load_manifest`` and the plugin loader. Allowed:
``InputError``, or success with a result that keeps the contract (``FuzzTarget.check``: valid
float32 finite array and affine within the size limit; a binary manifest never silently multi-class;
a .nii.gz or a hashed plugin never read with other values). Anything else fails the test.
"""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import badinput_corpus as bc

#: examples per target (12 targets): the suite stays around a minute on 2 CPU cores
EXAMPLES = {"plugin_json": 60, "dicom": 80}
DEFAULT_EXAMPLES = 120
OUTCOMES: dict[str, Counter] = {}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    return bc.fuzz_targets(tmp_path_factory.mktemp("fuzz"))


NAMES = ["nifti", "nifti_gz", "nrrd", "nhdr", "mha", "npy", "dicom", "manifest", "task_json", "plugin_json",
         "safetensors", "safetensors_nohash"]


@pytest.mark.parametrize("name", NAMES)
def test_fuzz_only_input_errors(name, targets, capfd):
    target = targets[name]
    counts = OUTCOMES.setdefault(name, Counter())

    @settings(max_examples=EXAMPLES.get(name, DEFAULT_EXAMPLES), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(which=st.integers(0, 3), ops=bc.ops_strategy())
    def one(which, ops):
        outcome = target.run(which, ops)
        counts[outcome.split(":")[0]] += 1
        assert not outcome.startswith("silent"), (name, ops, outcome)

    one()
    err = capfd.readouterr().err
    assert "Traceback" not in err
    # nothing but the readers' own one-line warnings reaches the terminal (no C++ library noise)
    assert all(line.startswith("anymc3d: warning: ") for line in err.splitlines() if line.strip()), err[:500]
    assert counts["refused"] + counts["accepted"] >= 20, counts


def test_fuzz_real_load_plugin(targets):
    """A few mutated plugins through the real ``load_plugin`` (fresh backbone each time)."""
    from anymc3d.errors import InputError

    seen = Counter()

    @settings(max_examples=12, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(name=st.sampled_from(["plugin_json", "safetensors_nohash"]), ops=bc.ops_strategy())
    def one(name, ops):
        t = targets[name]
        p = t.mutated[0]
        p.write_bytes(bc.mutate(t.originals[p], ops, t.header, t.text))
        try:
            bc.load_plugin_checked(t.folder, full=True)
            seen["accepted"] += 1
        except InputError:
            seen["refused"] += 1
        finally:
            p.write_bytes(t.originals[p])

    one()
    assert sum(seen.values()) >= 12
