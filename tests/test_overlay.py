"""The heat-map overlay (issue 10): the map over the image in the image's own geometry, stamped, beside the bare map.

Real images (a 1955x1841 CR chest from pydicom-data, pydicom's CT_small), the bundled cards' preprocessing,
and the real pipeline writing both files for a finding.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_agent.bus.finding import message_id
from edge_agent.config import DEFAULT_CONFIG_PATH, load_config
from edge_agent.dicom.pixels import decode_frames
from edge_agent.dicom.spool import Spool
from edge_agent.errors import DecodeError
from edge_agent.housekeeping import Housekeeping
from edge_agent.inference.card import load_card
from edge_agent.inference.preprocess import display_grey, placement
from edge_agent.journal import Journal
from edge_agent.metrics import Metrics
from edge_agent.overlay import (
    BOX_RGB,
    STAMP,
    STAMP_BAND_RGB,
    OverlayText,
    blend,
    display_size,
    heat_on_image,
    render_overlay,
    write_overlay,
)
from tests.dicomfiles import CT_SMALL, RG1_UNCR, make_ct_series
from tests.test_pipeline import harness
from tests.test_validate import read_png

ENGINES = Path(__file__).resolve().parent.parent / "engines"
CXR = load_card(ENGINES / "cxr-nodule")  # letterboxes (keep_aspect: true)
CT = load_card(ENGINES / "ct-demo")  # stretches (keep_aspect: false)


def test_the_overlay_keeps_the_images_aspect_ratio_within_size_limits() -> None:
    assert display_size((1955, 1841)) == (1024, 964)  # shrunk, aspect kept
    assert display_size((128, 128)) == (512, 512)  # small images grow, so the stamp can be read
    assert display_size((700, 600)) == (700, 600)
    assert display_size((100, 2000)) == (51, 1024)


def test_the_letterbox_is_cut_off_before_the_map_goes_back_onto_the_image() -> None:
    """A map that is hot exactly where the image lay in the model input is hot over the whole image."""
    shape = (1955, 1841)
    place = placement(shape, CXR.preprocessing)
    assert place.left > 0  # this radiograph is letterboxed left and right
    heat = np.zeros(CXR.preprocessing.resize, dtype=np.float32)
    heat[place.top : place.top + place.height, place.left : place.left + place.width] = 1.0
    on_image = heat_on_image(heat, CXR.preprocessing, shape, display_size(shape))
    assert on_image.shape == (1024, 964)
    assert on_image[:, 2:-2].min() > 0.9  # the margins' zeros are gone (the edge columns blur by a pixel)


def test_a_stretched_input_is_stretched_back() -> None:
    """ct-demo squeezes any image into 256x256: its map's top-left quadrant is the image's top-left quadrant."""
    heat = np.zeros((16, 16), dtype=np.float32)
    heat[:8, :8] = 1.0
    on_image = heat_on_image(heat, CT.preprocessing, (300, 600), (300, 600))
    assert on_image[:140, :280].min() > 0.9 and on_image[160:, :].max() < 0.1 and on_image[:, 320:].max() < 0.1


def test_a_cold_map_leaves_the_image_as_the_model_saw_it() -> None:
    [frame] = decode_frames(RG1_UNCR)
    grey = display_grey(frame, CXR.preprocessing, 1024, 964)
    picture = blend(grey, np.zeros((1024, 964), dtype=np.float32))
    assert picture.shape == (1024, 964, 3)
    assert np.array_equal(picture[:, :, 0], np.round(grey * 255).astype(np.uint8))
    assert picture[:, :, 0].std() > 20  # anatomy, not a blank


def test_the_rendered_overlay_is_stamped_boxed_and_described() -> None:
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[8:16, 4:12] = 0.9
    text = OverlayText("cxr-nodule 1.0.0-sim", "nodule", 0.91, 0.288752)
    picture = render_overlay(RG1_UNCR, 0, CXR.preprocessing, heat, (0.1, 0.25, 0.4, 0.5), text)
    top_band = picture[:40]
    assert STAMP == "NOT FOR DIAGNOSTIC USE"
    assert (top_band == STAMP_BAND_RGB).all(axis=-1).mean() > 0.5  # the red band ...
    assert (top_band == (255, 255, 255)).all(axis=-1).sum() > 300  # ... with the words in white
    band = int(np.argmin((picture[:, 0] == STAMP_BAND_RGB).all(axis=-1)))  # the stamp's rows, above the image
    image = picture[band : band + 1024]
    assert image.shape[1] == 964 and picture.shape[0] > band + 1024  # the description below the image
    # The box (fractions of the image) on the image: its top edge at 25% of the rows, from 10% to 40% across.
    assert (image[round(0.25 * 1023), 100:380] == BOX_RGB).all()
    # The heat where the map put it, in the image's coordinates: the map's cells 4-12 of 32 across the model
    # input are columns 100-356 of the image once the 7-pixel letterbox is cut off; its rows 8-16, rows 256-512.
    hot = image[350:420, 200:260].astype(int)
    cold = image[700:900, 600:900].astype(int)
    assert (hot[:, :, 0] - hot[:, :, 2]).mean() > 60
    assert abs(cold[:, :, 0] - cold[:, :, 2]).mean() < 40  # grey: red and blue alike
    assert "nodule score 0.910 (threshold 0.288752)" in text.lines()[0]


def test_a_frame_the_instance_does_not_have_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="frame 3"):
        write_overlay(tmp_path / "x.png", CT_SMALL, 3, CT.preprocessing, np.zeros((16, 16), np.float32), None, None)
    assert not (tmp_path / "x.png").exists()


# --- the pipeline writes both files and the finding names them ---------------------------------------------


def test_the_finding_names_the_bare_map_and_the_overlay_and_both_are_written(tmp_path: Path) -> None:
    slices = make_ct_series(tmp_path / "ct", 3)

    async def main() -> None:
        with harness(tmp_path) as h:
            async with h.pipeline() as pipe:
                for path in slices:
                    h.store(pipe, path)
                [f] = await h.wait_findings(1)
                fid = f["finding_id"]
                assert f["heatmap"]["image"] == f"heatmaps/{fid}.png"
                assert f["heatmap"]["overlay"] == f"heatmaps/{fid}.overlay.png"
                # Drawn once the finding is queued, not before: it follows, from a hard link to the driving
                # slice (the series may be released meanwhile), which is removed once it is drawn.
                await _until(lambda: (h.config.state_dir / f["heatmap"]["overlay"]).is_file())
                await _until(lambda: not list(h.spool.tmp_dir.glob("overlay-*")))
            bare = read_png_any((h.config.state_dir / f["heatmap"]["image"]).read_bytes())
            overlay = read_png((h.config.state_dir / f["heatmap"]["overlay"]).read_bytes())
            assert bare[:2] == (256, 256)  # the model's geometry
            width, height, rgb = overlay
            assert width == 512 and height > 512  # CT_small's 128x128, grown, plus the stamp and the words
            assert (rgb[:30] == STAMP_BAND_RGB).all(axis=-1).any()

    asyncio.run(main())


def test_an_overlay_that_cannot_be_written_is_counted_and_the_finding_keeps_its_bare_map(tmp_path: Path) -> None:
    slices = make_ct_series(tmp_path / "ct", 2)
    series_uid = str(pydicom.dcmread(slices[0], stop_before_pixels=True).SeriesInstanceUID)

    async def main() -> None:
        with harness(tmp_path) as h:
            async with h.pipeline() as pipe:
                first = h.store(pipe, slices[0])  # the series is open (two expected): its finding id is known
                fid = message_id(series_uid, "ct-demo", h.card.version, 0,
                                 h.journal.series(first.series_id).first_received)
                blocked = h.config.state_dir / "heatmaps" / f"{fid}.overlay.png"
                (blocked / "in-the-way").mkdir(parents=True)  # a folder where the file should go
                h.store(pipe, slices[1])
                [f] = await h.wait_findings(1)
                await _until(lambda: h.metrics.heatmap_write_errors._value.get() == 1)
            # The finding went out first, naming the overlay; the overlay's failure is counted, the bare map stays.
            assert f["heatmap"]["image"] == f"heatmaps/{fid}.png"
            assert f["heatmap"]["overlay"] == f"heatmaps/{fid}.overlay.png"
            assert not (h.config.state_dir / f["heatmap"]["overlay"]).is_file()
            assert (h.config.state_dir / f["heatmap"]["image"]).is_file()

    asyncio.run(main())


async def _until(cond: Callable[[], bool], timeout_seconds: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def read_png_any(data: bytes) -> tuple[int, int]:
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width, height


# --- retention sweeps both files ------------------------------------------------------------------------------


def test_retention_removes_old_overlays_with_their_bare_maps(tmp_path: Path) -> None:
    config = load_config(DEFAULT_CONFIG_PATH).model_copy(update={"state_dir": tmp_path / "state"})
    folder = config.state_dir / "heatmaps"
    folder.mkdir(parents=True)
    old_id, new_id = "a" * 64, "b" * 64
    files = {name: folder / name for name in (f"{old_id}.png", f"{old_id}.overlay.png", f"{new_id}.png",
                                                f"{new_id}.overlay.png")}
    for path in files.values():
        path.write_bytes(b"x")
    expired = time.time() - config.heatmaps.retain_days * 86_400 - 60
    for name in (f"{old_id}.png", f"{old_id}.overlay.png"):
        os.utime(files[name], (expired, expired))
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        Housekeeping(config, journal, Spool(tmp_path / "spool", 1), Metrics()).tick()
    finally:
        journal.close()
    assert sorted(p.name for p in folder.iterdir()) == [f"{new_id}.overlay.png", f"{new_id}.png"]
