"""Long fuzz run of issue 17: mutated NIfTI/NRRD/MHA/npy/DICOM/manifest/task.json/plugin files, >= 10,000 cases.

    OMP_NUM_THREADS=1 python benchmarks/fuzz/run.py --cases 10000 [--seed 0] [--out fuzz.json]
    OMP_NUM_THREADS=1 python benchmarks/fuzz/run.py --serve-uploads --cases 10000   # the service's upload path

``--serve-uploads``: seed kinds for MHA / NRRD headers and zips through ``anymc3d serve``'s upload
path (``benchmarks/fuzz/serve_uploads.py``: crashes and reads outside the upload must both be 0).

Same targets, mutations and contract as ``tests/test_fuzz.py`` (``tests/badinput_corpus.py``), driven by
hypothesis without derandomisation. Every case must end in ``InputError`` ("refused") or in a success
that keeps the contract ("accepted"); a "silent" change or any other exception ("crash", with its
traceback's last line and the mutation ops) is counted and makes the exit code 1. One plugin case in
25 goes through the real ``load_plugin`` (a fresh backbone). Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2] / "tests"))

#: share of the cases per target (DICOM and plugin specs are slower per case)
WEIGHTS = {"nifti": 1.0, "nifti_gz": 1.0, "nrrd": 1.0, "nhdr": 1.0, "mha": 1.0, "npy": 1.0, "dicom": 1.0,
           "manifest": 1.0, "task_json": 0.6, "plugin_json": 0.8, "safetensors": 0.8, "safetensors_nohash": 0.8}


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the summary JSON here")
    ap.add_argument("--serve-uploads", action="store_true",
                    help="fuzz the service's upload path instead (NRRD / MHA headers, zips; serve_uploads.py)")
    a = ap.parse_args(argv)
    if a.serve_uploads:
        sys.path.insert(0, str(HERE.parent))
        import serve_uploads

        return serve_uploads.main(a.cases, a.seed, a.out)

    import torch
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    import badinput_corpus as bc
    from anymc3d.errors import InputError

    torch.set_num_threads(1)
    t0 = time.time()
    devnull = open(os.devnull, "w")
    stderr, sys.stderr = sys.stderr, devnull  # the readers' one-line warnings, thousands of them
    try:
        work = Path(tempfile.mkdtemp(prefix="anymc3d-fuzz-"))
        targets = bc.fuzz_targets(work)
        total_w = sum(WEIGHTS.values())
        quota = {n: max(1, round(a.cases * w / total_w)) for n, w in WEIGHTS.items()}
        quota["nifti"] += a.cases - sum(quota.values())
        counts = {n: Counter() for n in targets}
        problems: list[dict] = []
        rss_after: dict[str, float] = {"start": _rss_mb()}
        for name, n_cases in quota.items():
            target = targets[name]
            done = 0
            round_ = 0
            while done < n_cases:
                @seed(a.seed * 1000 + round_ * 100 + list(quota).index(name))
                @settings(max_examples=n_cases - done, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                @given(which=st.integers(0, 3), ops=bc.ops_strategy())
                def one(which, ops):
                    nonlocal done
                    done += 1
                    full = name.startswith(("plugin", "safetensors")) and done % 25 == 0
                    try:
                        if full:
                            p = target.mutated[which % len(target.mutated)]
                            p.write_bytes(bc.mutate(target.originals[p], ops, target.header, target.text))
                            try:
                                bc.load_plugin_checked(target.folder, full=True)
                                outcome = "accepted"
                            except InputError:
                                outcome = "refused"
                            finally:
                                p.write_bytes(target.originals[p])
                        else:
                            outcome = target.run(which, ops)
                    except Exception as exc:  # a crash: anything but InputError
                        tb = traceback.format_exception(exc)
                        outcome = "crash"
                        problems.append({"target": name, "kind": "crash", "ops": repr(ops)[:500],
                                         "error": f"{type(exc).__name__}: {str(exc)[:300]}", "where": tb[-2][:300]})
                    if outcome.startswith("silent"):
                        problems.append({"target": name, "kind": "silent", "ops": repr(ops)[:500], "what": outcome})
                    counts[name][outcome.split(":")[0]] += 1

                before = done
                one()
                round_ += 1
                if done == before:
                    break
            rss_after[name] = _rss_mb()
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    finally:
        sys.stderr = stderr
    summary = {
        "cases": sum(sum(c.values()) for c in counts.values()),
        "refused": sum(c["refused"] for c in counts.values()),
        "accepted": sum(c["accepted"] for c in counts.values()),
        "silent_changes": sum(c["silent"] for c in counts.values()),
        "crashes": sum(c["crash"] for c in counts.values()),
        "per_target": {n: dict(c) for n, c in counts.items()},
        "problems": problems[:50],
        "seed": a.seed, "wall_s": round(time.time() - t0, 1),
        "rss_mb_after_each_target": rss_after,
        "peak_rss_mb": round(int(status.get("VmHWM", "0 kB").split()[0]) / 1024, 1),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0 if summary["crashes"] == 0 and summary["silent_changes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
