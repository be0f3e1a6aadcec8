"""Issue 27: the service's security properties, one test per case, through FastAPI's TestClient (and a raw
ASGI call for slow uploads): uploads never make a reader open another file, zip directory limits, Host
and Origin checks, upload deadline, no server paths in answers, security headers, results disk cap,
stale service folders, TLS warning, the serve max-voxels default."""
from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("python_multipart", reason="the serve extra is not installed (python-multipart)")
sitk = pytest.importorskip("SimpleITK")
from fastapi.testclient import TestClient  # noqa: E402

from test_serve import TOKEN, client, engines, scan, private_tmp, serve_config, store, upload, write_scan  # noqa: E402,F401

from anymc3d.serve import create_app  # noqa: E402

SHAPE = (12, 12, 10)                      # x y z of the headers below (1440 uint8 voxels)
SECRET = (b"TOP-SECRET-" * 200)[:1440]    # a file outside the upload that a header names


def post(c, name: str, body: bytes, **params):
    return c.post("/v1/predict", params=params or None, files={"file": (name, body, "application/octet-stream")})


def _all_text(c, r) -> bytes:
    """The answer and, if it names result files, all of them (decompressed)."""
    out = r.content
    if r.status_code == 200 and "result" in r.json():
        d = r.json()
        urls = [d["result"]["image"]] + [u for t in d["heatmaps"].values() for lab in t["labels"].values()
                                         for u in (lab["nifti"], lab["png"])]
        for u in urls:
            data = c.get(u).content
            out += gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return out


# ------------------------------------------------------------------------------------------ 1. inline data
def nrrd_headers(secret: str) -> dict[str, bytes]:
    base = "type: uchar\ndimension: 3\nsizes: 12 12 10\nencoding: raw\n"
    h = {
        "plain": f"NRRD0004\n{base}data file: {secret}\n\n",
        "datafile": f"NRRD0004\n{base}datafile: {secret}\n\n",
        "space_before_colon": f"NRRD0004\n{base}data file : {secret}\n\n",
        "upper": f"NRRD0004\n{base}DATA FILE: {secret}\n\n",
        "list": f"NRRD0005\n{base}data file: LIST\n{secret}\n",
        "cr_only": f"NRRD0004\n{base}data file: {secret}\n\n".replace("\n", "\r"),
        "crlf": f"NRRD0004\n{base}data file: {secret}\n\n".replace("\n", "\r\n"),
        "tab": f"NRRD0004\n{base}\tdata file: {secret}\n\n",
        "pattern": f"NRRD0004\n{base}data file: {secret[:-4]}%04d 0 9 1 2\n\n",
        "key_value": f"NRRD0004\n{base}data file:={secret}\n\n",
        "long_header": "NRRD0004\n" + "# padding past 64 KiB\n" * 4000 + f"{base}data file: {secret}\n\n",
    }
    return {k: v.encode() for k, v in h.items()}


def mha_headers(secret: str) -> dict[str, bytes]:
    base = "ObjectType = Image\nNDims = 3\nDimSize = 12 12 10\nElementType = MET_UCHAR\n"
    h = {
        "plain": f"{base}ElementDataFile = {secret}\n",
        "colon": f"{base}ElementDataFile: {secret}\n",
        "lower": f"{base}elementdatafile = {secret}\n",
        "leading_ws": f"{base}  \tElementDataFile = {secret}\n",
        "cr_only": f"{base}ElementDataFile = {secret}\n".replace("\n", "\r"),
        "crlf": f"{base}ElementDataFile = {secret}\n".replace("\n", "\r\n"),
        "list": f"{base}ElementDataFile = LIST\n" + f"{secret}\n" * 10,
        "long_header": "ObjectType = Image\n" + "Comment = padding past 64 KiB\n" * 3000
                       + base.split("\n", 1)[1] + f"ElementDataFile = {secret}\n",
        # MetaIO reads the 3 numbers of DimSize and parses the rest of that line as the next field
        "value_injection": base.replace("DimSize = 12 12 10", f"DimSize = 12 12 10 ElementDataFile = {secret}")
                           + "ElementDataFile = LOCAL\n" + "\0" * 1440,
        "header_size": f"{base}HeaderSize = 12\nElementDataFile = LOCAL\n" + "\0" * 1440,
    }
    return {k: v.encode("latin-1") for k, v in h.items()}


def test_headers_naming_other_files_are_refused_and_never_read(client, tmp_path):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(SECRET)
    # the corpus is real: unpatched SimpleITK reads the secret through several of these spellings
    leaked = []
    for fmt, cases in (("nrrd", nrrd_headers(str(secret))), ("mha", mha_headers(str(secret)))):
        for kind, body in cases.items():
            p = tmp_path / f"{kind}.{fmt}"
            p.write_bytes(body)
            try:
                if sitk.GetArrayFromImage(sitk.ReadImage(str(p))).tobytes() == SECRET:
                    leaked.append(f"{kind}.{fmt}")
            except RuntimeError:
                pass
    assert sum(n.endswith(".nrrd") for n in leaked) >= 5 and sum(n.endswith(".mha") for n in leaked) >= 3, leaked
    for fmt, cases in (("nrrd", nrrd_headers(str(secret))), ("mha", mha_headers(str(secret)))):
        for kind, body in cases.items():
            r = post(client, f"{kind}.{fmt}", body, heatmaps="true", tasks="frozen")
            assert r.status_code == 422, (kind, fmt, r.status_code, r.text)
            detail = r.json()["detail"]
            assert detail.startswith(f"{kind}.{fmt}: ") and "\n" not in detail, detail
            assert SECRET[:11] not in _all_text(client, r), (kind, fmt)


def _geometry_image(comp_vector=False):
    import math

    rng = np.random.default_rng(3)
    if comp_vector:
        return sitk.GetImageFromArray(rng.random((10, 12, 12, 3)).astype(np.float32), isVector=True)
    img = sitk.GetImageFromArray((rng.random((10, 12, 12)) * 1000).astype(np.int16))
    img.SetSpacing((0.7, 1.3, 2.1))
    img.SetOrigin((-10.5, 3.25, 7.0))
    c, s = math.cos(0.3), math.sin(0.3)
    img.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    return img


def test_normal_nrrd_and_mha_uploads_read_identically(client, tmp_path):
    """SimpleITK-written files (compressed or not, scalar and 3-channel) and hand-written ones (CRLF,
    comments, unknown fields, a header past 64 KiB) give the same array and affine through the service."""
    from test_serve import nii_from_bytes

    from anymc3d.io import read_volume

    files = []
    for vec in (False, True):
        for comp in (False, True):
            for suf in (".nrrd", ".mha"):
                p = tmp_path / f"w{int(vec)}{int(comp)}{suf}"
                sitk.WriteImage(_geometry_image(vec), str(p), useCompression=comp)
                files.append(p)
    raw = np.arange(1440, dtype=np.uint8).tobytes()
    hand = {
        "hand_crlf.nrrd": ("NRRD0004\r\n# a comment\r\ntype: uchar\r\ndimension: 3\r\nsizes: 12 12 10\r\n"
                           "spacings: 1.5 1.5 2\r\nendian: little\r\nencoding: raw\r\nanswer:=42\r\n\r\n").encode() + raw,
        "hand_long.nrrd": ("NRRD0004\n" + "# pad\n" * 12000 + "type: unsigned char\ndimension: 3\nsizes: 12 12 10\n"
                           "space: right-anterior-superior\nspace directions: (1.5,0,0) (0,1.5,0) (0,0,2)\n"
                           "encoding: raw\n\n").encode() + raw,
        "hand_crlf.mha": ("ObjectType = Image\r\nNDims = 3\r\nModality = MET_MOD_CT\r\nDimSize = 12 12 10\r\n"
                          "ElementSpacing = 1.5 1.5 2\r\nElementType = MET_UCHAR\r\nElementDataFile = LOCAL\r\n").encode() + raw,
        "hand_long.mha": ("ObjectType = Image\nNDims = 3\nDimSize = 12 12 10\n" + "Comment = pad\n" * 6000 +
                          "Offset = 1 2 3\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n").encode() + raw,
    }
    for name, body in hand.items():
        (tmp_path / name).write_bytes(body)
        files.append(tmp_path / name)
    for p in files:
        want = read_volume(str(p), content_warnings=False)
        r = client.post("/v1/predict", params={"heatmaps": "true", "tasks": "frozen"}, files=upload(p))
        assert r.status_code == 200, (p.name, r.text)
        img = nii_from_bytes(client.get(r.json()["result"]["image"]).content)
        arr = want.array if want.array.ndim == 3 else want.array[0]
        np.testing.assert_array_equal(np.asarray(img.dataobj), arr.astype(np.float32), err_msg=p.name)
        np.testing.assert_allclose(img.affine, want.affine, atol=1e-6, err_msg=p.name)


def test_upload_folder_holds_only_the_rewritten_upload(store, engines, tmp_path):
    body = ("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 12 12 10\nencoding: raw\nfoo: bar\n"
            "content: x\n\n").encode() + bytes(1440)
    keep = tmp_path / "kept"
    with TestClient(create_app(serve_config(store, keep=keep), engines=engines)) as c:
        assert post(c, "vol.nrrd", body, tasks="frozen").status_code == 200
    (kept,) = keep.iterdir()
    assert [p.name for p in kept.iterdir()] == ["vol.nrrd"]
    text = (kept / "vol.nrrd").read_bytes()
    assert text.startswith(b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 12 12 10\nencoding: raw\ncontent: x\n\n")
    assert b"foo" not in text and text.endswith(bytes(1440))  # unknown fields dropped, the data kept


# ------------------------------------------------------------------------------------------ 3. zips
def _zip_bytes(names, data=b"x") -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_STORED) as z:
        for n in names:
            z.writestr(n, b"" if n.endswith("/") else data)
    return b.getvalue()


def _with_eocd(data: bytes, entries=None, cd_size=None, zip64_entries=None) -> bytes:
    at = data.rfind(b"PK\x05\x06")
    sig, d1, d2, n1, n2, size, off, com = struct.unpack("<4s4H2LH", data[at:at + 22])
    if zip64_entries is not None:
        rec = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, zip64_entries, zip64_entries, size, off)
        loc = struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
        eocd = struct.pack("<4s4H2LH", sig, d1, d2, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, com)
        return data[:at] + rec + loc + eocd
    n = n1 if entries is None else entries
    eocd = struct.pack("<4s4H2LH", sig, d1, d2, n, n, size if cd_size is None else cd_size, off, com)
    return data[:at] + eocd


def test_zip_member_limits_from_the_directory(store, engines, monkeypatch):
    import anymc3d.serve.uploads as up

    files = _zip_bytes([f"f{i}.dcm" for i in range(30)])
    dirs = _zip_bytes([f"d{i}/" for i in range(20)] + ["a.dcm", "b.dcm"])
    one = _zip_bytes(["a.dcm"])
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w") as z:
        for i in range(8):
            zi = zipfile.ZipInfo(f"{i}" + "n" * 60000)
            zi.comment, zi.extra = b"c" * 60000, struct.pack("<HH", 0xCAFE, 60000) + b"e" * 60000
            z.writestr(zi, b"x")
    big_dir = b.getvalue()
    opened = []
    real = up.zipfile.ZipFile
    monkeypatch.setattr(up.zipfile, "ZipFile", lambda *a, **k: opened.append(a) or real(*a, **k))
    with TestClient(create_app(serve_config(store, max_zip_members=10), engines=engines)) as c:
        cases = {"files.zip": (files, 413), "dirs.zip": (dirs, 413),                # folders count too
                 "lying_count.zip": (_with_eocd(files, entries=1), 413),            # the walk counts
                 "zip64.zip": (_with_eocd(one, zip64_entries=10**9), 413),
                 "huge_dir.zip": (_with_eocd(files, cd_size=0x7FFFFFF0), 400),      # larger than the file
                 "big_dir.zip": (big_dir, 413)}                                      # 8 entries, 1.4 MiB
        for name, (body, status) in cases.items():
            r = post(c, name, body)
            assert r.status_code == status, (name, r.text)
            assert r.json()["detail"].startswith(name), r.json()
        assert opened == []  # refused before zipfile parsed any directory
    z64 = _with_eocd(one, zip64_entries=10**9)
    assert up._central_directory(io.BytesIO(z64), len(z64), "z")[0] == 10**9  # the zip64 record is read


def test_zip_duplicate_names_get_counters(store, engines, private_tmp, tmp_path):
    body = _zip_bytes([f"s{i}/IM0001.dcm" for i in range(300)] + ["x/IM0001_1.dcm"])
    from anymc3d.serve.uploads import save_upload

    up = save_upload(io.BytesIO(body), "dup.zip", 2**24, 2**24, 1000, parent=tmp_path)
    names = sorted(p.name for p in up.path.iterdir())
    assert len(names) == 301 and "IM0001.dcm" in names and "IM0001_299.dcm" in names and "IM0001_1_1.dcm" in names
    assert max(len(n) for n in names) < 20
    up.discard()
    with TestClient(create_app(serve_config(store), engines=engines)) as c:
        r = post(c, "dup.zip", body)
        assert r.status_code == 422 and "too long" not in r.json()["detail"], r.text  # the DICOM reader's refusal


# ------------------------------------------------------------------------------------------ 4. hardening
def test_trusted_host(store, engines, scan):
    with TestClient(create_app(serve_config(store), engines=engines)) as c:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            r = c.get("/v1/plugins", headers={"Host": host})
            assert r.status_code == 400, host
            assert r.headers["x-content-type-options"] == "nosniff"
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "testserver"):
            assert c.get("/healthz", headers={"Host": host}).status_code == 200, host
        assert post(c, "scan.nii.gz", scan.read_bytes()).status_code == 200
    with TestClient(create_app(serve_config(store, host="10.1.2.3", allowed_hosts=["ai.hospital.example"]),
                               engines=engines), base_url="http://ai.hospital.example") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"Host": "localhost"}).status_code == 400


def test_origin_check(store, engines, scan):
    with TestClient(create_app(serve_config(store, allowed_origins=["https://viewer.example"]), engines=engines)) as c:
        for origin in ("http://evil.example", "null", "http://testserver.evil.example", "http://localhost:1234"):
            r = c.post("/v1/predict", headers={"Origin": origin}, files=upload(scan))
            assert r.status_code == 403 and "--allowed-origins" in r.json()["detail"], origin
            assert c.get("/v1/plugins", headers={"Origin": origin}).status_code == 403
            assert c.get("/healthz", headers={"Origin": origin}).status_code == 200  # public
        assert c.app.state.admission.in_flight == 0
        for origin in ("http://testserver", "http://testserver:80", "https://viewer.example"):
            r = c.post("/v1/predict", headers={"Origin": origin}, params={"tasks": "frozen"}, files=upload(scan))
            assert r.status_code == 200, origin


def _multipart(body: bytes, boundary="bnd") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.nii\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()


async def _raw_call(app, chunks, delay: float, stall: bool):
    """One POST /v1/predict through the ASGI app; ``receive`` sends ``chunks`` ``delay`` s apart and then
    (``stall``) never completes the body."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "root_path": "",
             "query_string": b"", "client": ("127.0.0.1", 1), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"multipart/form-data; boundary=bnd")]}
    queue = list(chunks)
    sent = []

    async def receive():
        if queue:
            await asyncio.sleep(delay)
            return {"type": "http.request", "body": queue.pop(0), "more_body": True}
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    t0 = time.monotonic()
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), time.monotonic() - t0


def test_slow_upload_gets_408_and_frees_its_slot(store, engines):
    app = create_app(serve_config(store, upload_timeout_s=0.5, queue=1), engines=engines)
    data = _multipart(b"\0" * 4000)
    status, body, took = asyncio.run(_raw_call(app, [data[:100]], 0.0, stall=True))
    assert status == 408 and "--upload-timeout" in body["detail"] and took < 5
    assert app.state.admission.in_flight == 0
    # a trickle: 20 bytes every 0.1 s against a minimum of 1 KiB/s after a 0.3 s grace
    from anymc3d.serve.guard import Guard

    guard = next(m for m in app.user_middleware if m.cls is Guard)
    guard.kwargs.update(min_rate_bps=1024.0, rate_grace_s=0.3, upload_timeout_s=30.0)
    app.middleware_stack = app.build_middleware_stack()
    chunks = [data[i:i + 20] for i in range(0, 400, 20)]
    status, body, took = asyncio.run(_raw_call(app, chunks, 0.1, stall=True))
    assert status == 408 and "--min-upload-rate" in body["detail"] and took < 5, body
    assert app.state.admission.in_flight == 0
    app.state.workers.close(), app.state.results.close(), app.state.workspace.close()


def test_no_server_paths_in_answers(store, engines, scan, tmp_path, private_tmp):
    import tempfile

    with TestClient(create_app(serve_config(store, token=TOKEN), engines=engines)) as c:
        ok = {"Authorization": f"Bearer {TOKEN}"}
        ws = c.app.state.workspace
        forbidden = [str(store), str(store.resolve()), str(ws.root), str(ws.uploads), str(c.app.state.results.root),
                     tempfile.gettempdir(), str(tmp_path)]
        answers = [c.get("/healthz"), c.get("/v1/plugins", headers=ok), c.get("/v1/plugins"),
                   c.get("/openapi.json"), c.get(f"/v1/results/{'0' * 32}/x.png", headers=ok)]
        r = c.post("/v1/predict", headers=ok, files=upload(scan))
        assert r.status_code == 200 and all(t["plugin"] == n for n, t in r.json()["tasks"].items())
        answers.append(r)
        r = c.post("/v1/predict", headers=ok, params={"heatmaps": "true", "tasks": "lesion,grade"}, files=upload(scan))
        assert r.status_code == 200
        answers.append(r)
        files = _all_text(c, r)
        (tmp_path / "bad.nii.gz").write_bytes(b"junk")
        for body in ((tmp_path / "bad.nii.gz").read_bytes(), b""):
            answers.append(c.post("/v1/predict", headers=ok, files={"file": ("bad.nii.gz", body, "x/y")}))
        answers.append(post(c, "x.txt", b"1"))
        answers.append(c.post("/v1/predict", headers=ok, files={"file": ("e.nrrd", b"NRRD0004\ndata file: /etc/passwd\n\n", "x")}))
        assert {a.status_code for a in answers} >= {200, 400, 401, 404, 422}
        for a in answers:
            text = a.content + b"".join(k + b"=" + v for k, v in a.headers.raw)
            for f in forbidden:
                assert f.encode() not in text, (a.request.url, f, a.text[:300])
        for f in forbidden[:2]:
            assert f.encode() not in files  # the heatmap NIfTI / PNG files do not name the store


def test_security_headers_on_every_response(store, engines, scan):
    with TestClient(create_app(serve_config(store, max_upload_mb=0.001, token=TOKEN), engines=engines)) as c:
        answers = [c.get("/"), c.get("/static/app.js"), c.get("/healthz"), c.get("/v1/plugins"), c.get("/nope"),
                   c.post("/v1/predict", headers={"Authorization": f"Bearer {TOKEN}"}, files=upload(scan)),
                   c.get("/healthz", headers={"Host": "evil.example"})]
        assert [a.status_code for a in answers] == [200, 200, 200, 401, 404, 413, 400]
        for a in answers:
            csp = a.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-eval'" not in csp.replace("wasm-unsafe-eval'", "")
            assert a.headers["x-content-type-options"] == "nosniff" and a.headers["x-frame-options"] == "DENY"
            assert a.headers["referrer-policy"] == "no-referrer"
    # the viewer keeps to the policy: no inline scripts or handlers, scripts from /static only
    from anymc3d.serve.app import STATIC

    html = (STATIC / "index.html").read_text(encoding="utf-8")
    import re

    assert not re.search(r"\son[a-z]+=", html) and not re.search(r"<script(?![^>]*\ssrc=)", html)


def test_results_disk_cap(store, engines, scan):
    params = {"heatmaps": "true", "tasks": "frozen"}
    with TestClient(create_app(serve_config(store), engines=engines)) as c:
        d = c.post("/v1/predict", params=params, files=upload(scan)).json()
        one = c.app.state.results.used_bytes
    assert one > 0
    with TestClient(create_app(serve_config(store, max_results_mb=1.5 * one / 2**20), engines=engines)) as c:
        first = c.post("/v1/predict", params=params, files=upload(scan)).json()
        assert c.get(first["result"]["image"]).status_code == 200
        second = c.post("/v1/predict", params=params, files=upload(scan)).json()
        assert c.get(first["result"]["image"]).status_code == 404  # the oldest result was evicted
        assert c.get(second["result"]["image"]).status_code == 200
        assert not (c.app.state.results.root / first["result"]["id"]).exists()
        assert c.app.state.results.used_bytes <= 1.5 * one and c.app.state.results.evicted == 1
    with TestClient(create_app(serve_config(store, max_results_mb=0.5 * one / 2**20), engines=engines)) as c:
        r = c.post("/v1/predict", params=params, files=upload(scan))
        assert r.status_code == 507 and "--max-results-mb" in r.json()["detail"]
        assert list(c.app.state.results.root.iterdir()) == []
        assert c.post("/v1/predict", params={"tasks": "frozen"}, files=upload(scan)).status_code == 200
    assert d["result"]["id"]


def test_stale_service_folders_removed_at_start(store, engines, private_tmp):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def folder(name, owner=None, age_s=0.0):
        d = private_tmp / name
        (d / "uploads").mkdir(parents=True)
        (d / "uploads" / "f").write_bytes(b"x")
        if owner is not None:
            (d / "owner").write_text(owner)
        t = time.time() - age_s
        for p in (d / "uploads" / "f", d / "uploads", d / "owner", d):
            if p.exists():
                os.utime(p, (t, t))
        return d

    stale = folder(f"anymc3d-serve-{dead.pid}-a", f"{dead.pid} 1\n")
    live = folder(f"anymc3d-serve-{os.getpid()}-b", f"{os.getpid()}\n")
    recycled = folder(f"anymc3d-serve-{os.getpid()}-c", f"{os.getpid()} 1\n")  # same pid, another start time
    old_legacy = folder("anymc3d-upload-old", age_s=3 * 86400)
    new_legacy = folder("anymc3d-results-new")
    other = folder("something-else", age_s=3 * 86400)
    with TestClient(create_app(serve_config(store), engines=engines)) as c:
        removed = set(c.app.state.workspace.removed)
        root = c.app.state.workspace.root
        assert (root / "owner").read_text().split()[0] == str(os.getpid())
    assert removed == {stale, old_legacy, recycled}
    assert not stale.exists() and not old_legacy.exists() and not recycled.exists()
    assert live.exists() and new_legacy.exists() and other.exists() and not root.exists()


def test_cli_tls_warning_ssl_and_defaults(store, tmp_path, monkeypatch, capsys):
    import uvicorn

    from anymc3d.cli import build_parser, main
    from anymc3d.serve.cli import config_from_args, warnings_for
    from anymc3d.serve.config import SERVE_MAX_VOXELS

    tok = tmp_path / "token"
    tok.write_text(TOKEN)
    os.chmod(tok, 0o600)
    base = ["serve", "--plugins", str(store), "--weights", "random"]

    def warned(*extra):
        a = build_parser().parse_args(base + list(extra))
        return " ".join(warnings_for(a, config_from_args(a)))

    assert "without TLS" in warned("--host", "0.0.0.0", "--token-file", str(tok))
    assert "without --token-file" in warned("--host", "10.0.0.5")
    assert warned("--token-file", str(tok)) == ""
    assert warned("--host", "0.0.0.0", "--token-file", str(tok), "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem") == ""
    a = build_parser().parse_args(base)
    cfg = config_from_args(a)
    assert cfg.max_voxels == SERVE_MAX_VOXELS == 512 ** 3 and cfg.allowed_hosts[:1] == ["127.0.0.1"]
    assert "testserver" in cfg.allowed_hosts
    assert "testserver" not in config_from_args(build_parser().parse_args(base + ["--host", "10.0.0.5"])).allowed_hosts
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    assert main(base + ["--host", "0.0.0.0", "--token-file", str(tok), "--ssl-certfile", "c.pem",
                        "--ssl-keyfile", "k.pem"]) == 0
    assert seen["ssl_certfile"] == "c.pem" and seen["ssl_keyfile"] == "k.pem"
    assert "serving on https://0.0.0.0" in capsys.readouterr().err
    assert main(base + ["--ssl-certfile", "c.pem"]) == 2
    assert "go together" in capsys.readouterr().err
