"""Issue 19: ``anymc3d serve`` API (FastAPI TestClient): every endpoint, every error code, the token,
upload limits, several tasks in one request, missing views, DICOM zips, result expiry; the JSON equals
``anymc3d predict --plugins`` and the heatmaps equal ``anymc3d explain``.

The helpers here (``build_store``, ``write_scan``, ``serve_config``) are shared by the other
``test_serve_*`` files (browser, schema, load)."""
from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("python_multipart", reason="the serve extra is not installed (python-multipart)")
from fastapi.testclient import TestClient  # noqa: E402

from anymc3d.backbones import create_backbone  # noqa: E402
from anymc3d.cli import main  # noqa: E402
from anymc3d.serve import ServeConfig, create_app  # noqa: E402
from anymc3d.serve.service import load_engines  # noqa: E402
from anymc3d.store import PluginStore  # noqa: E402

from conftest import random_plugin  # noqa: E402

SIZE = 32
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
TOKEN = "s3cret-token-0123456789"


# ------------------------------------------------------------------------------------------ helpers
def build_store(root: Path, n_extra: int = 0, size: int = SIZE, weights: str = "random") -> Path:
    """lesion (full LoRA), trunk (shared trunk, 2 views), frozen (pooling only), grade (multi-class),
    pair (two inputs: one upload leaves t2 missing) + ``n_extra`` more binary tasks."""
    bb = create_backbone("efficientnet_lite0", weights=weights, input_size=size)
    src, store = root / "plugins", PluginStore(root / "store")
    kinds = [("lesion", {}), ("trunk", {"last_k": 1, "views": ("axial", "coronal")}), ("frozen", {"r": 0}),
             ("grade", {"task_type": "multiclass", "labels": ("clear", "low", "high")}),
             ("pair", {"inputs": ("image", "t2"), "last_k": 1})]
    kinds += [(f"extra{i}", {"last_k": 1}) for i in range(n_extra)]
    for seed, (name, kw) in enumerate(kinds, start=1):
        store.add(random_plugin(bb, src, name, seed, size=size, prefix="sv", **kw))
    return root / "store"


def scan_array(seed: int = 0, shape=(12, 12, 10)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = (rng.random(shape) * 0.2).astype(np.float32)
    c = [s // 3 for s in shape]
    a[c[0]:c[0] + 3, c[1]:c[1] + 3, c[2]:c[2] + 3] = 1.0
    return a


def write_scan(path: Path, seed: int = 0, shape=(12, 12, 10)) -> Path:
    nib.save(nib.Nifti1Image(scan_array(seed, shape), AFFINE), str(path))
    return path


def serve_config(store: Path, **kw) -> ServeConfig:
    return ServeConfig(plugins=store, weights="random", **kw)


def nii_from_bytes(data: bytes):
    import gzip

    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def upload(path: Path, name: str | None = None) -> dict:
    return {"file": (name or path.name, path.read_bytes(), "application/octet-stream")}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def engines(store):
    return load_engines(serve_config(store))


@pytest.fixture(scope="module")
def client(store, engines):
    with TestClient(create_app(serve_config(store), engines=engines)) as c:
        yield c


@pytest.fixture()
def scan(tmp_path) -> Path:
    return write_scan(tmp_path / "scan.nii.gz")


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch) -> Path:
    """The service's temporary folders go here, so the test can see what is left behind."""
    import tempfile

    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


# ------------------------------------------------------------------------------------------ endpoints
def test_healthz_plugins_openapi_index(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["tasks"] == 5 and h["auth_required"] is False and h["queue_capacity"] == 8
    d = client.get("/v1/plugins").json()
    rows = {p["task"]: p for p in d["plugins"]}
    assert sorted(rows) == ["frozen", "grade", "lesion", "pair", "trunk"] and d["skipped"] == []
    assert rows["grade"]["labels"] == ["clear", "low", "high"] and rows["grade"]["task_type"] == "multiclass"
    assert rows["pair"]["inputs"] == ["image", "t2"] and rows["trunk"]["streams"] == ["image:axial", "image:coronal"]
    assert rows["lesion"]["backbone"] == "efficientnet_lite0" and rows["frozen"]["mode"] == "frozen"
    assert d["backbone_fingerprint"] == rows["lesion"]["backbone_fingerprint"]
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/v1/predict"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert {"400", "413", "422", "503"} <= set(post["responses"])
    assert "securitySchemes" not in schema.get("components", {})  # this one needs no token
    assert {"/healthz", "/v1/plugins", "/v1/results/{result_id}/{name}"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 404  # Swagger UI would come from a CDN
    page = client.get("/")
    assert page.status_code == 200 and "static/vendor/niivue.umd.js" in page.text
    assert client.get("/static/vendor/niivue.umd.js").status_code == 200
    assert client.get("/static/app.js").status_code == 200


def test_viewer_loads_nothing_from_the_network():
    from anymc3d.serve.app import STATIC

    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
    vendor = STATIC / "vendor"
    assert (vendor / "LICENSE.niivue.txt").read_text(encoding="utf-8").startswith("BSD 2-Clause License")
    import hashlib

    digest = hashlib.sha256((vendor / "niivue.umd.js").read_bytes()).hexdigest()
    assert digest in (vendor / "README.txt").read_text(encoding="utf-8")  # the shipped file is the one the build script made


def test_serve_never_imports_training():
    """The service is inference: it imports the store, explain and runtime code, never training."""
    import ast

    for path in sorted((Path(__file__).resolve().parents[1] / "src" / "anymc3d" / "serve").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert "training" not in (node.module or "").split("."), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("anymc3d.training") for a in node.names), path.name


def test_predict_equals_cli_predict_plugins(client, store, scan, tmp_path, monkeypatch, capsys):
    r = client.post("/v1/predict", files=upload(scan))
    assert r.status_code == 200, r.text
    got = r.json()
    monkeypatch.chdir(scan.parent)  # the CLI names the file as it was given: scan.nii.gz
    # the service here runs the frozen passes on the Python API's engine (torch); the CLI's default is auto
    assert main(["predict", "--plugins", str(store), "scan.nii.gz", "--out", str(tmp_path / "cli"),
                 "--weights", "random", "--engine", "torch"]) == 0
    want = json.loads((tmp_path / "cli" / "scan.json").read_text())
    got.pop("seconds"), want.pop("seconds")
    # predict --out records which plugins wrote a file (its resume check, docs/scale.md); the service writes no folder
    assert sorted(want.pop("plugins_sha256")) == sorted(got["tasks"])
    assert sorted(got["tasks"]) == ["frozen", "grade", "lesion", "pair", "trunk"]
    assert got["inputs"] == {"image": "scan.nii.gz"}
    for name in got["tasks"]:
        g, w = got["tasks"][name], want["tasks"][name]
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-6)
        for k in ("predicted", "threshold", "views_used", "views_missing", "inputs", "task_type", "warnings"):
            assert g[k] == w[k], (name, k)
        # the CLI names the plugin folder it was given; the service names the plugin only (no server paths)
        assert g["plugin"] == name and w["plugin"] == str(store / name)
    assert {k: v for k, v in got.items() if k != "tasks"} == {k: v for k, v in want.items() if k != "tasks"}
    # a multi-class task: probabilities over its labels, arg-max decision
    grade = got["tasks"]["grade"]
    assert sorted(grade["probabilities"]) == ["clear", "high", "low"] and len(grade["predicted"]) == 1


def test_several_tasks_and_missing_views(client, scan):
    r = client.post("/v1/predict", params={"tasks": "pair,trunk"}, files=upload(scan))
    assert r.status_code == 200, r.text
    d = r.json()
    assert sorted(d["tasks"]) == ["pair", "trunk"]
    # one upload for a two-input plugin: the first input is used, the second's views are reported missing
    assert d["tasks"]["pair"]["views_used"] == ["image:axial"] and d["tasks"]["pair"]["views_missing"] == ["t2:axial"]
    assert d["tasks"]["trunk"]["views_used"] == ["image:axial", "image:coronal"]
    assert "heatmaps" not in d and "result" not in d
    bad = client.post("/v1/predict", params={"tasks": "trunk,nope"}, files=upload(scan))
    assert bad.status_code == 400 and bad.json()["detail"] == (
        "tasks: unknown task(s) nope; this service runs frozen, grade, lesion, pair, trunk")


def test_every_upload_format(client, scan, tmp_path):
    """NIfTI, NRRD, MetaImage and NumPy uploads of one volume give the NIfTI's probabilities."""
    import SimpleITK as sitk

    ref = client.post("/v1/predict", params={"tasks": "lesion,grade"}, files=upload(scan)).json()
    img = sitk.ReadImage(str(scan))
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(img, str(tmp_path / f"vol{suffix}"))
    nii = tmp_path / "vol.nii"
    nib.save(nib.load(str(scan)), str(nii))
    for path in (nii, tmp_path / "vol.nrrd", tmp_path / "vol.mha"):
        r = client.post("/v1/predict", params={"tasks": "lesion,grade"}, files=upload(path))
        assert r.status_code == 200, (path.name, r.text)
        d = r.json()
        assert d["id"] == "vol" and d["inputs"] == {"image": path.name}
        for t in ("lesion", "grade"):
            assert d["tasks"][t]["probabilities"] == pytest.approx(ref["tasks"][t]["probabilities"], abs=1e-5), path.name
    np.save(tmp_path / "arr.npy", scan_array())  # no geometry: identity affine, so other spacing, other numbers
    r = client.post("/v1/predict", params={"tasks": "lesion"}, files=upload(tmp_path / "arr.npy"))
    assert r.status_code == 200 and r.json()["inputs"] == {"image": "arr.npy"}
    pickled = tmp_path / "evil.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object))  # an object array needs unpickling: refused
    r = client.post("/v1/predict", files=upload(pickled))
    assert r.status_code == 422 and "evil.npy" in r.json()["detail"]


def test_heatmaps_equal_explain_and_are_served(client, store, scan, tmp_path, monkeypatch):
    r = client.post("/v1/predict", params={"heatmaps": "true", "tasks": "lesion,grade"}, files=upload(scan))
    assert r.status_code == 200, r.text
    d = r.json()
    assert sorted(d["heatmaps"]) == ["grade", "lesion"]
    les = d["heatmaps"]["lesion"]
    assert les["method"] == "gradcam" and list(les["labels"]) == ["pos"]
    assert sorted(d["heatmaps"]["grade"]["labels"]) == ["clear", "high", "low"]
    assert len(les["slice_positions_mm"]["image:axial"]) == 10
    # the slice centres are on the input's world grid: axial slice k of 10 at z = 2 mm * k
    assert [p[2] for p in les["slice_positions_mm"]["image:axial"]] == pytest.approx([2.0 * k for k in range(10)])
    nii = client.get(les["labels"]["pos"]["nifti"])
    assert nii.status_code == 200 and nii.headers["cache-control"] == "private, no-store"
    got = nii_from_bytes(nii.content)
    png = client.get(les["labels"]["pos"]["png"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    img = nii_from_bytes(client.get(d["result"]["image"]).content)
    np.testing.assert_allclose(img.get_fdata(), scan_array(), atol=1e-6)
    np.testing.assert_allclose(img.affine, AFFINE)
    # the same map as `anymc3d explain PLUGIN scan.nii.gz`
    monkeypatch.chdir(scan.parent)
    assert main(["explain", str(store / "lesion"), "scan.nii.gz", "--out", str(tmp_path / "ex"),
                 "--weights", "random", "--no-figure"]) == 0
    want = nib.load(str(tmp_path / "ex" / "scan_heatmap.nii.gz"))
    assert got.shape == want.shape == (12, 12, 10)
    np.testing.assert_allclose(got.affine, want.affine)
    np.testing.assert_allclose(got.get_fdata(), want.get_fdata(), atol=1e-5)
    assert got.get_fdata().max() == pytest.approx(1.0)
    # no path out of the result; unknown ids and files are 404
    rid = d["result"]["id"]
    for url in (f"/v1/results/{rid}/../../etc/passwd", f"/v1/results/{rid}/lesion/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                f"/v1/results/{'0' * 32}/image.nii.gz", f"/v1/results/{rid}/nope.png"):
        assert client.get(url).status_code == 404, url


def test_results_expire(store, engines, scan):
    with TestClient(create_app(serve_config(store, results_ttl_s=0.4), engines=engines)) as c:
        d = c.post("/v1/predict", params={"heatmaps": "true", "tasks": "frozen"}, files=upload(scan)).json()
        url = d["heatmaps"]["frozen"]["labels"]["pos"]["png"]
        assert c.get(url).status_code == 200 and d["result"]["expires_in_s"] == 0
        folder = c.app.state.results.root / d["result"]["id"]
        assert folder.is_dir()
        time.sleep(0.5)
        r = c.get(url)
        assert r.status_code == 404 and "expired" in r.json()["detail"]
        assert not folder.exists()


# ------------------------------------------------------------------------------------------ bad input
def _cli_error(store, folder: Path, name: str, monkeypatch, capsys) -> str:
    monkeypatch.chdir(folder)
    capsys.readouterr()
    assert main(["predict", "--plugins", str(store), name, "--out", str(folder / "out"), "--weights", "random"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("anymc3d: error: ")
    return err[len("anymc3d: error: "):]


def test_bad_input_gives_the_cli_message(client, store, tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    np.save(tmp_path / "five.npy", np.zeros((5, 8, 8, 8), np.float32))  # 5 channels: the backbones take 1 or 3
    for name in ("broken.nii.gz", "five.npy"):
        r = client.post("/v1/predict", files=upload(tmp_path / name))
        assert r.status_code == 422, (name, r.text)
        assert r.json()["detail"] == _cli_error(store, tmp_path, name, monkeypatch, capsys), name
        assert name in r.json()["detail"] and str(tmp_path) not in r.json()["detail"]


def test_unusable_requests(client, tmp_path, private_tmp):
    cases = {
        ("notes.txt", b"hello"): (400, "notes.txt: unsupported upload type"),
        ("", b"x"): (422, None),  # no file name: FastAPI does not take it as a file
        ("empty.nii.gz", b""): (400, "empty.nii.gz: the upload is empty"),
        ("series.zip", b"PK not really"): (400, "series.zip: not a readable zip file"),
        ("ext.nrrd", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: /etc/passwd\n\n"):
            (422, "ext.nrrd: NRRD header names a separate data file"),
        ("ext.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_FLOAT\n"
                    b"ElementDataFile = /etc/passwd\n"): (422, "ext.mha: MetaImage header names a separate data file"),
    }
    for (name, body), (status, start) in cases.items():
        r = client.post("/v1/predict", files={"file": (name, body, "application/octet-stream")})
        assert r.status_code == status, (name, r.text)
        if start:
            assert r.json()["detail"].startswith(start), (name, r.json())
    r = client.post("/v1/predict")
    assert r.status_code == 422 and r.json() == {"detail": "file: Field required"}
    r = client.post("/v1/predict", params={"heatmaps": "maybe"}, files=upload(write_scan(tmp_path / "s.nii.gz")))
    assert r.status_code == 422 and r.json()["detail"].startswith("heatmaps:")
    assert not list(private_tmp.rglob("anymc3d-upload-*"))  # every refused upload was removed


def test_upload_limit_413(store, engines, tmp_path, private_tmp):
    big = write_scan(tmp_path / "big.nii", shape=(40, 40, 40))  # 256 KB uncompressed
    with TestClient(create_app(serve_config(store, max_upload_mb=0.1), engines=engines)) as c:
        r = c.post("/v1/predict", files=upload(big))  # Content-Length over the limit: refused before reading
        assert r.status_code == 413 and "0.1 MiB" in r.json()["detail"] and "--max-upload-mb" in r.json()["detail"]
        # no Content-Length (chunked): counted while it streams in
        boundary = "xyz123"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.nii\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode()
        data = head + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()

        def chunks():
            for i in range(0, len(data), 16384):
                yield data[i:i + 16384]

        r = c.post("/v1/predict", content=chunks(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]
        small = write_scan(tmp_path / "small.nii.gz")
        assert c.post("/v1/predict", files=upload(small), params={"tasks": "frozen"}).status_code == 200
    assert not list(private_tmp.rglob("anymc3d-upload-*"))


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_dicom_zip(client, store, engines, tmp_path, monkeypatch, capsys):
    from badinput_corpus import dicom_series

    series = dicom_series(tmp_path / "ct", n=8)
    files = {f"study/ct/{p.name}": p.read_bytes() for p in sorted(series.iterdir())}
    files["../../outside.txt"] = b"zip slip"  # flattened into the upload folder, never written outside
    z = _zip(tmp_path / "ct.zip", files)
    r = client.post("/v1/predict", files=upload(z), params={"tasks": "lesion,trunk"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["id"] == "ct" and d["inputs"] == {"image": "ct"} and sorted(d["tasks"]) == ["lesion", "trunk"]
    assert not (tmp_path.parent / "outside.txt").exists()
    # the same numbers as the CLI on the folder
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--plugins", str(store), "ct", "--out", str(tmp_path / "cli"), "--weights", "random"]) == 0
    want = json.loads((tmp_path / "cli" / "ct.json").read_text())
    for t in ("lesion", "trunk"):
        assert d["tasks"][t]["probabilities"] == pytest.approx(want["tasks"][t]["probabilities"], abs=1e-6)
    # a series with a missing slice: 422 with the reader's message; an empty zip and a zip bomb are refused
    gap = dicom_series(tmp_path / "gap", n=8, skip=(3,))
    r = client.post("/v1/predict", files=upload(_zip(tmp_path / "gap.zip", {p.name: p.read_bytes() for p in gap.iterdir()})))
    assert r.status_code == 422 and r.json()["detail"].startswith("gap") and "--allow-gaps" in r.json()["detail"]
    r = client.post("/v1/predict", files=upload(_zip(tmp_path / "none.zip", {"dir/": b""})))
    assert r.status_code == 400 and "no files" in r.json()["detail"]
    with TestClient(create_app(serve_config(store, max_unzipped_mb=1), engines=engines)) as c:
        bomb = _zip(tmp_path / "bomb.zip", {"a.dcm": b"\0" * (3 * 2**20)})
        assert bomb.stat().st_size < 20000
        r = c.post("/v1/predict", files=upload(bomb))
        assert r.status_code == 413 and "uncompressed" in r.json()["detail"]


def test_token(store, engines, scan):
    with TestClient(create_app(serve_config(store, token=TOKEN), engines=engines)) as c:
        assert c.get("/healthz").json()["auth_required"] is True  # public
        assert c.get("/").status_code == 200
        schema = c.get("/openapi.json").json()
        assert "HTTPBearer" in schema["components"]["securitySchemes"]
        assert "401" in schema["paths"]["/v1/predict"]["post"]["responses"]
        for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
            r = c.get("/v1/plugins", headers=hdr)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", hdr
            r = c.post("/v1/predict", headers=hdr, files=upload(scan))
            assert r.status_code == 401
        ok = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/v1/plugins", headers=ok).status_code == 200
        d = c.post("/v1/predict", headers=ok, params={"heatmaps": "true", "tasks": "frozen"}, files=upload(scan)).json()
        assert c.get(d["result"]["image"]).status_code == 401
        assert c.get(d["result"]["image"], headers=ok).status_code == 200


def test_behind_a_proxy_prefix(store, engines, scan):
    """--root-path: result URLs carry the prefix, and a proxy that forwards the prefix still needs the token."""
    app = create_app(serve_config(store, token=TOKEN), engines=engines)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app, root_path="/anymc3d") as c:
        d = c.post("/anymc3d/v1/predict", headers=ok, params={"heatmaps": "true", "tasks": "frozen"},
                   files=upload(scan)).json()
        assert d["result"]["image"].startswith("/anymc3d/v1/results/")
        assert c.get(d["result"]["image"], headers=ok).status_code == 200
        assert c.get(d["result"]["image"]).status_code == 401
        assert c.post("/anymc3d/v1/predict", files=upload(scan)).status_code == 401


def test_queue_full_503(store, engines, scan):
    with TestClient(create_app(serve_config(store, queue=1), engines=engines)) as c:
        adm = c.app.state.admission
        assert adm.try_acquire()  # a request in flight holds the only slot
        try:
            r = c.post("/v1/predict", files=upload(scan))
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert "queue full" in r.json()["detail"]
            assert c.get("/v1/plugins").status_code == 200  # only predictions queue
        finally:
            adm.release()
        assert c.post("/v1/predict", files=upload(scan), params={"tasks": "frozen"}).status_code == 200
        assert adm.in_flight == 0 and adm.refused == 1


def test_upload_folder_removed_or_kept(store, engines, scan, tmp_path, private_tmp):
    with TestClient(create_app(serve_config(store), engines=engines)) as c:
        assert c.post("/v1/predict", files=upload(scan), params={"tasks": "frozen"}).status_code == 200
        (tmp_path / "bad.nii.gz").write_bytes(b"junk")
        assert c.post("/v1/predict", files=upload(tmp_path / "bad.nii.gz")).status_code == 422
        assert not list(private_tmp.rglob("anymc3d-upload-*"))
        results_root = c.app.state.results.root
        service_root = c.app.state.workspace.root  # $TMPDIR/anymc3d-serve-<pid>-*/{uploads,results,owner}
        assert results_root.parent == service_root and service_root.parent == private_tmp
        assert oct(results_root.stat().st_mode & 0o777) == oct(service_root.stat().st_mode & 0o777) == "0o700"
    assert not results_root.exists() and not service_root.exists()  # removed at shutdown
    keep = tmp_path / "kept"
    with TestClient(create_app(serve_config(store, keep=keep), engines=engines)) as c:
        assert c.post("/v1/predict", files=upload(scan), params={"tasks": "frozen"}).status_code == 200
    kept = list(keep.iterdir())
    assert len(kept) == 1 and (kept[0] / "scan.nii.gz").read_bytes() == scan.read_bytes()


# ------------------------------------------------------------------------------------------ CLI
def test_serve_cli_refuses_bad_settings(store, tmp_path, capsys):
    assert main(["serve", "--plugins", str(tmp_path / "nope")]) == 2
    assert "plugin store not found" in capsys.readouterr().err
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    os.chmod(tok, 0o644)
    assert main(["serve", "--plugins", str(store), "--token-file", str(tok)]) == 2
    assert "chmod 600" in capsys.readouterr().err
    tok.write_text("short")
    os.chmod(tok, 0o600)
    assert main(["serve", "--plugins", str(store), "--token-file", str(tok)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    from anymc3d.cli import build_parser

    a = build_parser().parse_args(["serve", "--plugins", str(store)])
    assert (a.host, a.port, a.max_upload_mb, a.workers, a.device, a.queue) == ("127.0.0.1", 8000, 512.0, 1, "auto", 8)
    from anymc3d.serve.cli import config_from_args

    tok.write_text(TOKEN)
    cfg = config_from_args(build_parser().parse_args(["serve", "--plugins", str(store), "--token-file", str(tok),
                                                      "--weights", "random", "--max-voxels", "1000"]))
    assert cfg.token == TOKEN and cfg.max_voxels == 1000


def test_reader_limits_apply_and_do_not_leak(store, engines, scan):
    from anymc3d.io import options

    before = options.current()
    with TestClient(create_app(serve_config(store, max_voxels=500), engines=engines)) as c:
        r = c.post("/v1/predict", files=upload(scan))  # 1200 voxels > 500
        assert r.status_code == 422 and "--max-voxels" in r.json()["detail"]
    assert options.current() == before


# ------------------------------------------------------------------------------------------ real server
class running_server:
    """``with running_server(app) as base_url:`` uvicorn on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app) -> None:
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    limit_concurrency=1000, backlog=256))

    def __enter__(self) -> str:
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
