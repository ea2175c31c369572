"""Drive OHIF (served by segnode.demo.viewer) in Debian's chromium with Playwright, as a radiologist would use
it: open a study, double-click a series, confirm loading the SEG; read back what it shows through OHIF's own
services (segments, colours, camera) and screenshots of the viewport."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

CHROMIUM = "/usr/bin/chromium"
# WebGL through SwiftShader: no GPU needed (../shared/VIEWER.md)
CHROMIUM_ARGS = ["--no-sandbox", "--enable-unsafe-swiftshader", "--disable-background-networking", "--use-gl=angle",
                 "--use-angle=swiftshader"]
VIEWPORT = "default"  # OHIF's one viewport in the default layout


class OHIFPage:
    """One OHIF tab on one study; `errors` collects every console error and uncaught exception."""

    def __init__(self, browser: Any, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1100, "height": 800}, device_scale_factor=1)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        # OHIF's first-run tour overlays every click
        self.page.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        self.page.goto(url)
        self.page.wait_for_selector("[data-cy=series-description-label]", timeout=120_000)
        self.wait_until("() => !!window.services?.cornerstoneViewportService?.getCornerstoneViewport('default')")

    def close(self) -> None:
        self.page.close()

    def wait_until(self, predicate: str, timeout: float = 60) -> Any:
        """Poll the JS `predicate` (an arrow function) until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.page.evaluate(predicate)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"OHIF: {predicate} still false after {timeout} s; console errors: {self.errors}")

    def series_descriptions(self) -> list[str]:
        return [e.inner_text().strip() for e in self.page.query_selector_all("[data-cy=series-description-label]")]

    def open_series(self, description: str) -> None:
        """Double-click the study browser's thumbnail of that series; confirm loading a SEG when asked."""
        (label,) = [e for e in self.page.query_selector_all("[data-cy=series-description-label]")
                    if e.inner_text().strip() == description]
        label.dblclick()
        try:
            self.page.wait_for_selector("[data-cy=yes-hydrate-btn]", timeout=15_000).click()
        except Exception:  # noqa: BLE001 - not every series asks (an SR opens in its own viewport)
            pass

    def segments(self) -> list[tuple[int, str, tuple[int, int, int]]]:
        """Once a SEG is shown: (segment index, label, RGB) of each segment, as OHIF's segmentation service
        holds them for the viewport."""
        self.wait_until("() => window.services.segmentationService.getSegmentations().some("
                        "s => Object.keys(s.segments).length > 0)", timeout=120)
        rows = self.page.evaluate(f"""() => {{
            const service = window.services.segmentationService;
            return service.getSegmentations().flatMap(s => Object.values(s.segments).map(g => [
                g.segmentIndex, g.label, service.getSegmentColor('{VIEWPORT}', s.segmentationId, g.segmentIndex)]));
        }}""")
        return [(int(i), str(label), (int(c[0]), int(c[1]), int(c[2]))) for i, label, c in rows]

    def show_image(self, index: int) -> dict[str, Any]:
        """Scroll the viewport to image `index` of its stack; returns its SOP Instance UID and the canvas to
        patient mapping OHIF's camera uses (`origin` + x * `dx` + y * `dy`, canvas pixels to mm)."""
        return self.page.evaluate(f"""async () => {{
            const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('{VIEWPORT}');
            await vp.setImageIdIndex({index});
            vp.render();
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
            const imageId = vp.getCurrentImageId();
            const o = vp.canvasToWorld([0, 0]), x = vp.canvasToWorld([1, 0]), y = vp.canvasToWorld([0, 1]);
            return {{
                sop: window.cornerstone.metaData.get('instance', imageId).SOPInstanceUID,
                origin: o, dx: x.map((v, i) => v - o[i]), dy: y.map((v, i) => v - o[i]),
                count: vp.getImageIds().length,
            }};
        }}""")

    def set_segment_visibility(self, visible: set[int], segments: list[int]) -> None:
        """Show exactly the `visible` segments of the loaded SEG, then render."""
        self.page.evaluate(f"""async () => {{
            const service = window.services.segmentationService;
            const seg = service.getSegmentations()[0];
            for (const i of {sorted(segments)}) {{
                service.setSegmentVisibility('{VIEWPORT}', seg.segmentationId, i, {sorted(visible)}.includes(i));
            }}
            const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('{VIEWPORT}');
            vp.render();
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
            await new Promise(r => setTimeout(r, 150));
        }}""")

    def canvas(self) -> np.ndarray:
        """The viewport's canvas as shown: (rows, cols, 3) uint8, one pixel per canvas pixel."""
        from PIL import Image

        png = self.page.locator("canvas.cornerstone-canvas").first.screenshot()
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def sr_measurements(self) -> list[dict[str, Any]]:
        """Once an SR is open: its measurements as OHIF lists them (tracking identifier, the labels shown beside
        the drawing as (label, value) pairs, whether it found the image to draw on)."""
        self.wait_until("() => window.services.displaySetService.getActiveDisplaySets().some("
                        "d => d.Modality === 'SR' && d.isLoaded && d.measurements?.length)", timeout=120)
        return self.page.evaluate("""() => window.services.displaySetService.getActiveDisplaySets()
            .filter(d => d.Modality === 'SR' && d.isLoaded).flatMap(d => d.measurements.map(m => ({
                name: m.TrackingIdentifier, loaded: !!m.loaded, labels: m.labels.map(l => [l.label, l.value]),
                sop: m.ReferencedSOPInstanceUID || null, graphic: m.graphicType || null})))""")

    def drawn_outlines(self) -> dict[str, np.ndarray]:
        """The SR outlines drawn (cornerstone's annotation state): Tracking Unique Identifier -> (n, 2) points in
        the pixel coordinates of the image drawn on (column, row; pixel centres at integers, as cornerstone counts)."""
        rows = self.page.evaluate("""() => window.cornerstoneTools.annotation.state.getAllAnnotations()
            .filter(a => a.metadata?.toolName === 'DICOMSRDisplay').map(a => [
                a.annotationUID,
                a.data.handles.points.map(p => window.cornerstone.utilities.worldToImageCoords(
                    a.metadata.referencedImageId, p))])""")
        return {str(label): np.asarray(points, float) for label, points in rows}
