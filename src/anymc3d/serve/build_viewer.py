"""Rebuild the viewer's vendored NiiVue: ``python -m anymc3d.serve.build_viewer`` (needs npm and the npm registry).

Fetches the pinned ``@niivue/niivue`` release with ``npm pack``, checks its sha512 against the pin, and
copies the package's self-contained browser build (``dist/niivue.umd.js``: NiiVue and its bundled
dependencies) into ``static/vendor/``, with the licence and a version note. The service then serves it
from the package: nothing is loaded from a CDN, the page works offline behind a firewall.
To move to another NiiVue release, change ``VERSION`` and ``INTEGRITY`` (``npm view @niivue/niivue@X dist.integrity``).
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@niivue/niivue"
VERSION = "0.69.0"
INTEGRITY = "sha512-YMjQvJgD1W2b7DuoxkwlC4VxbrgIePRJ5qyQzXKxi2v2MBVg285P/CIQyg46oDDGDIcaNlbd+MhtO/edMbXJkA=="
VENDOR = Path(__file__).with_name("static") / "vendor"
BUNDLED = {  # dependencies inside dist/niivue.umd.js (package.json "dependencies") and their licences
    "@lukeed/uuid": "MIT", "@ungap/structured-clone": "ISC", "array-equal": "MIT", "fflate": "MIT",
    "gl-matrix": "MIT", "nifti-reader-js": "MIT", "zarrita": "MIT"}
LICENSE = """BSD 2-Clause License

Copyright (c) 2021, Niivue
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def build(vendor: Path = VENDOR) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("build_viewer: npm not found (apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--json", "--silent"], cwd=tmp, check=True,
                             capture_output=True, text=True).stdout
        info = json.loads(out)[0]
        tgz = Path(tmp) / info["filename"]
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
        if digest != INTEGRITY:
            sys.exit(f"build_viewer: {tgz.name} has integrity {digest}, expected {INTEGRITY}")
        with tarfile.open(tgz) as tf:
            member = tf.getmember("package/dist/niivue.umd.js")
            data = tf.extractfile(member).read()
            meta = json.loads(tf.extractfile(tf.getmember("package/package.json")).read())
    if meta.get("license") != "BSD-2-Clause":
        sys.exit(f"build_viewer: {PACKAGE} {VERSION} declares licence {meta.get('license')!r}; check LICENSE before shipping")
    vendor.mkdir(parents=True, exist_ok=True)
    (vendor / "niivue.umd.js").write_bytes(data)
    (vendor / "LICENSE.niivue.txt").write_text(LICENSE, encoding="utf-8")
    notes = [f"{PACKAGE} {VERSION} (npm, {INTEGRITY}): dist/niivue.umd.js, BSD-2-Clause (LICENSE.niivue.txt)",
             f"sha256 of niivue.umd.js: {hashlib.sha256(data).hexdigest()}",
             "bundled in it (licences from npm):", *[f"  {k}: {v}" for k, v in BUNDLED.items()],
             "rebuild: python -m anymc3d.serve.build_viewer"]
    (vendor / "README.txt").write_text("\n".join(notes) + "\n", encoding="utf-8")
    print(f"wrote {vendor / 'niivue.umd.js'} ({len(data) / 2**20:.1f} MiB) from {PACKAGE} {VERSION}")
    return vendor / "niivue.umd.js"


if __name__ == "__main__":
    build()
