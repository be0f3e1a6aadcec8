"""Issue 19: the web viewer in a real browser (Debian's chromium, driven by Playwright; WebGL through
SwiftShader): upload a generated volume, wait for the probabilities and the heatmap overlay, check the
overlay is drawn (pixel statistics at opacity 1 and 0), click the slice-weight curve. Skips, with the
reason, only where the browser cannot be installed (``.ci/run`` installs it)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from test_serve import build_store, nii_from_bytes, running_server, serve_config, write_scan  # noqa: E402

from anymc3d.serve import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox", "--disable-gpu-sandbox"]


def overlay_pixels(png: bytes) -> int:
    """Pixels of the heatmap colour map ('warm': red to yellow) in a screenshot: red well above blue.
    The volume is grey (r = g = b) and the crosshair cyan, so neither counts."""
    import io

    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, b = a[..., 0], a[..., 2]
    return int(((r - b > 60) & (r > 120)).sum())


def test_viewer_upload_overlay_and_curve(tmp_path):
    store = build_store(tmp_path / "s")
    # issue 30: one task carries calibration, an OOD reference and conformal scores; its reference comes
    # from volumes of another generator (stripes), so the uploaded phantom is flagged
    from test_trust import attach_trust, other_generator
    from conftest import write_nifti
    rng = np.random.default_rng(5)
    ref = [write_nifti(tmp_path / f"ref{i}.nii.gz", other_generator(rng, (24, 24, 20))) for i in range(12)]
    attach_trust(store / "lesion", ref[:8], ref[8:], [0, 1, 0, 1], weights="random")
    scan = write_scan(tmp_path / "phantom.nii.gz", shape=(24, 24, 20))
    with running_server(create_app(serve_config(store))) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(base + "/")
            page.wait_for_selector("body[data-state=ready]", timeout=30_000)
            assert page.evaluate("window.anymc3dViewer.webgl"), "NiiVue could not get a WebGL context"
            page.set_input_files("#file", str(scan))
            page.wait_for_selector("body[data-overlay=loaded]", timeout=90_000)
            result = page.evaluate("window.anymc3dViewer.result")
            # every task's probabilities, decision and threshold are on the page
            assert sorted(result["tasks"]) == ["frozen", "grade", "lesion", "pair", "trunk"]
            for name, t in result["tasks"].items():
                row = page.locator(f"tr[data-task={name}]")
                text = row.inner_text()
                for lab, prob in t["probabilities"].items():
                    assert f"{lab} {prob:.3f}" in text, (name, text)
                assert row.locator("td.decision").inner_text() == ", ".join(t["predicted"])
                if t["task_type"] != "multiclass":
                    assert row.locator("td.threshold").inner_text() == str(round(t["threshold"], 4)).rstrip("0").rstrip(".")
                # the conformal prediction set and the OOD flag beside the probability (n/a for old plugins)
                ps, o = t["prediction_set"], t["ood"]
                pset, oodcell = row.locator("td.pset").inner_text(), row.locator("td.ood").inner_text()
                assert pset == ("{" + ", ".join(ps["labels"]) + "} at 90%" if ps else "n/a"), (name, pset)
                assert oodcell.startswith(("OUT OF DISTRIBUTION" if o["flag"] else "ok") if o else "n/a"), (name, oodcell)
            lesion = result["tasks"]["lesion"]
            assert lesion["prediction_set"] is not None and lesion["ood"]["flag"], lesion["ood"]
            assert "flagged" in page.locator("tr[data-task=lesion] td.ood").get_attribute("class")
            assert result["tasks"]["grade"]["ood"] is None and result["tasks"]["grade"]["trust_note"]
            # put the crosshair on the heatmap's brightest voxel, so all three planes cut through it
            task = page.evaluate("window.anymc3dViewer.task")
            heat = nii_from_bytes(page.request.get(base + result["heatmaps"][task]["labels"]["pos"]["nifti"]).body())
            vox = np.unravel_index(np.argmax(heat.get_fdata()), heat.shape)
            mm = (heat.affine @ np.array([*vox, 1.0]))[:3].tolist()
            page.evaluate("mm => { const nv = window.anymc3dViewer.nv; nv.scene.crosshairPos = nv.mm2frac(mm); nv.drawScene(); }", mm)
            page.fill("#opacity", "100")
            page.dispatch_event("#opacity", "input")
            page.wait_for_timeout(300)
            shown = page.locator("#nv").screenshot()
            page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
            page.fill("#opacity", "0")
            page.dispatch_event("#opacity", "input")
            page.wait_for_timeout(300)
            hidden = page.locator("#nv").screenshot()
            n_shown, n_hidden = overlay_pixels(shown), overlay_pixels(hidden)
            assert n_shown > 300 and n_hidden < n_shown / 20, (n_shown, n_hidden)
            # a click on the slice-weight curve moves the crosshair to that slice's centre
            box = page.locator("#curve").bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.75, box["y"] + box["height"] / 2)
            picked = page.evaluate("window.anymc3dViewer.picked")
            positions = result["heatmaps"][task]["slice_positions_mm"][picked["stream"]]
            assert 0 < picked["index"] < len(positions) - 1 and picked["mm"] == positions[picked["index"]]
            at = page.evaluate("Array.from(window.anymc3dViewer.nv.frac2mm(window.anymc3dViewer.nv.scene.crosshairPos))")
            assert np.allclose(at[:3], positions[picked["index"]], atol=0.8), (at, positions[picked["index"]])
            page.click("#views button[data-view=coronal]")
            assert page.evaluate("window.anymc3dViewer.nv.opts.sliceType") == 1
            assert (tmp_path / "viewer.png").stat().st_size > 10_000
            assert not errors, errors
            assert all(u.startswith(base) or u.startswith(("data:", "blob:")) for u in requests), requests
        finally:
            browser.close()
