"""Secondary-capture report: one rendered RGB page (model, findings, key slices, disclaimer).

A segmentation's page shows the key slices with the mask overlaid; a classifier's page shows
its findings (decided by the card's head) and the input's three central planes. The
slices shown are the prediction's ``key_slices`` when it names them (else those of largest
mask area), in its ``display_window`` when given (else the 1st-99th percentile); its
``measurements`` and findings are listed. Images a model registered onto the reference grid
(``Prediction.extra["display_images"]``: caption to SimpleITK image, e.g. a FLAIR registered
to DWI) are shown beside the reference at the same slices, with the same overlay.

The page is drawn with Pillow and numpy and wrapped in a highdicom ``SCImage`` (RGB, 8 bit,
uncompressed) so that any viewer shows it; the same page is written as ``report.png``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

from aenode.config import ResultsSettings
from aenode.dicomread import read_text
from aenode.infer.cards import ModelCard
from aenode.records import Prediction, Volume
from aenode.results.source import (
    findings_of,
    label_masks,
    reference_datasets,
    series_description,
    software_versions,
)
from aenode.results.uids import ResultUids
from aenode.version import __version__

__all__ = [
    "DISCLAIMER",
    "PAGE_SIZE",
    "REPORT_SERIES_OFFSET",
    "build_report",
    "central_planes",
    "key_planes",
    "key_slices",
    "render_page",
]

REPORT_SERIES_OFFSET = 2
PAGE_SIZE = (1024, 768)  # width, height
DISCLAIMER = "NOT FOR DIAGNOSTIC USE - automated research result, verify before any clinical use"
_FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))
_TILE = 300

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int, bold: bool = False) -> Font:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in _FONT_DIRS:
        if (folder / name).is_file():
            try:
                return ImageFont.truetype(str(folder / name), size)
            except OSError:
                break
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def key_slices(masks: np.ndarray, limit: int = 3) -> list[int]:
    """Slices to show: the one of largest area per label, then of largest total area.

    Parameters
    ----------
    masks : numpy.ndarray
        Boolean masks, shape (slices, rows, columns, labels).
    limit : int
        At most this many slice indices.

    Returns
    -------
    list of int
        Distinct slice indices in ascending order; the middle slice when all masks are empty.
    """
    chosen: list[int] = []
    areas = masks.sum(axis=(1, 2))  # (slices, labels)
    for label in range(areas.shape[1]):
        if areas[:, label].max() > 0:
            idx = int(areas[:, label].argmax())
            if idx not in chosen:
                chosen.append(idx)
    for idx in np.argsort(-areas.sum(axis=1), kind="stable"):
        if len(chosen) >= limit or areas.sum(axis=1)[idx] == 0:
            break
        if int(idx) not in chosen:
            chosen.append(int(idx))
    if not chosen:
        chosen = [masks.shape[0] // 2]
    return sorted(chosen[:limit])


def _tile(
    image: np.ndarray,
    masks: np.ndarray,
    colors: Sequence[Sequence[int]],
    *,
    window: tuple[float, float] | None = None,
    edge: int = _TILE,
) -> Image.Image:
    if window is not None:
        center, width = window
        lo, hi = center - width / 2, center + width / 2
    else:
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    gray = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for k, color in enumerate(colors):
        m = masks[..., k]
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.asarray(color, dtype=float)
    tile = Image.fromarray(rgb.astype(np.uint8), "RGB")
    scale = edge / max(tile.width, tile.height)
    size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
    return tile.resize(size, Image.Resampling.NEAREST)


def _finding_lines(prediction: Prediction, card: ModelCard) -> list[str]:
    findings = findings_of(prediction, card)
    if card.outputs.head == "softmax" and findings:
        (best,) = findings
        others = ", ".join(
            f"{name} {p:.3f}"
            for name, p in (prediction.class_probabilities or {}).items()
            if name != best.name
        )
        return [f"Finding: {best.name} (p = {best.probability:.3f})"] + (
            [f"other classes: {others}"] if others else []
        )
    lines = []
    for f in findings:
        verdict = "present" if f.present else "absent"
        if f.threshold is None and f.probability in (0.0, 1.0):  # a rule's yes/no
            lines.append(f"{f.name}: {verdict}")
            continue
        rule = f", threshold {f.threshold:.2f}" if f.threshold is not None else ""
        lines.append(f"{f.name}: p = {f.probability:.3f} ({verdict}{rule})")
    return lines


def _measurement_lines(prediction: Prediction, skip: set[str]) -> list[str]:
    lines = []
    for m in prediction.measurements:
        if m.probability and m.name in skip:
            continue
        if m.probability:
            lines.append(f"{m.name}: p = {m.value:.3f}")
        else:
            unit = "" if m.unit in ("1", "{ratio}") else f" {m.unit.replace('ml', 'mL')}"
            lines.append(f"{m.name}: {m.value:.3g}{unit}")
    return lines


def _display_images(prediction: Prediction, volume: Volume) -> list[tuple[str, np.ndarray]]:
    """Extra images on the reference grid to show beside it (``extra["display_images"]``)."""
    shown = prediction.extra.get("display_images") or {}
    out = []
    for caption, image in shown.items():
        if isinstance(image, sitk.Image) and image.GetSize() == volume.image.GetSize():
            out.append((str(caption), sitk.GetArrayViewFromImage(image).astype(np.float32)))
    return out


def _slice_grid(
    page: Image.Image,
    draw: ImageDraw.ImageDraw,
    top: int,
    columns: list[tuple[str, np.ndarray]],
    slices: list[int],
    masks: np.ndarray,
    colors: Sequence[Sequence[int]],
    window: tuple[float, float] | None,
) -> None:
    """Rows of key slices, one column per image (the reference first), overlaid."""
    small = _font(14)
    bottom = PAGE_SIZE[1] - 60
    rows = len(slices)
    size = int(min(_TILE, (bottom - top) / rows - 24, (PAGE_SIZE[0] - 60) / len(columns) - 20))
    size = max(size, 60)
    y = top
    for idx in slices:
        x = 30
        for i, (caption, image) in enumerate(columns):
            # the model's window is for the reference image; the others are auto-windowed
            tile = _tile(
                image[idx], masks[idx], colors, window=window if i == 0 else None, edge=size
            )
            label = (
                f"{caption}, slice {idx + 1} of {masks.shape[0]}"
                if caption
                else (f"slice {idx + 1} of {masks.shape[0]}")
            )
            draw.text((x, y + 2), label, fill=(0, 0, 0), font=small)
            page.paste(tile, (x, y + 20))
            x += size + 20
        y += size + 24


def central_planes(volume: Volume) -> list[tuple[str, np.ndarray]]:
    """The volume's three central planes, for a page without a mask (a classifier's input).

    Parameters
    ----------
    volume : aenode.records.Volume
        The reference volume.

    Returns
    -------
    list of (str, numpy.ndarray)
        Caption and 2-D float32 plane: the central slice, then the central planes along the
        rows and the columns, each resampled to square pixels and, for the latter two, with
        the patient's head up when the slices run along the body axis.
    """
    image = sitk.GetArrayViewFromImage(volume.image).astype(np.float32)  # (z, y, x)
    sx, sy, sz = volume.image.GetSpacing()
    direction = np.asarray(volume.image.GetDirection(), dtype=float).reshape(3, 3)
    nz, ny, nx = image.shape
    names = ("sagittal", "coronal", "axial")  # normal mostly along L, P or S (LPS)

    def plane_name(axis: int) -> str:
        return names[int(np.abs(direction[:, axis]).argmax())]

    head_up = direction[2, 2] > 0  # slice index grows towards the head: flip to show it on top
    planes = [
        (f"{plane_name(2)}, slice {nz // 2 + 1} of {nz}", image[nz // 2], sy / sx),
        (f"{plane_name(1)}, row {ny // 2 + 1} of {ny}", image[:, ny // 2, :], sz / sx),
        (f"{plane_name(0)}, column {nx // 2 + 1} of {nx}", image[:, :, nx // 2], sz / sy),
    ]
    out = []
    for i, (caption, plane, aspect) in enumerate(planes):
        if i and head_up:
            plane = plane[::-1]
        rows = max(1, round(plane.shape[0] * aspect))
        if rows != plane.shape[0]:
            index = np.minimum((np.arange(rows) / aspect).astype(int), plane.shape[0] - 1)
            plane = plane[index]
        out.append((caption, np.ascontiguousarray(plane)))
    return out


def key_planes(
    volume: Volume, prediction: Prediction, limit: int = 3
) -> list[tuple[str, np.ndarray]]:
    """Up to ``limit`` of a classifier's key slices, evenly spread over them, as planes.

    ``Prediction.key_slices`` index ``volume.datasets`` (the acquired slices); each is found
    on the volume's grid by its ImagePositionPatient, so that a grid with an interpolated
    slice (``Volume.correction``) still shows the slice that was acquired.

    Parameters
    ----------
    volume : aenode.records.Volume
        The reference volume.
    prediction : aenode.records.Prediction
        Its ``key_slices``.
    limit : int
        At most this many planes.

    Returns
    -------
    list of (str, numpy.ndarray)
        Caption and 2-D float32 slice; empty when there are no key slices.
    """
    keys = sorted({k for k in prediction.key_slices if 0 <= k < len(volume.datasets)})
    if not keys:
        return []
    picked = sorted({keys[(2 * i + 1) * len(keys) // (2 * limit)] for i in range(limit)})
    image = sitk.GetArrayViewFromImage(volume.image)
    nz = image.shape[0]
    out = []
    for k in picked:
        position = volume.datasets[k].get("ImagePositionPatient")
        if position is None:
            continue
        point = [float(v) for v in position]
        z = int(round(volume.image.TransformPhysicalPointToContinuousIndex(point)[2]))
        if 0 <= z < nz:
            caption = f"key slice {k + 1} of {len(volume.datasets)}"
            out.append((caption, image[z].astype(np.float32)))
    return out


def _note_lines(prediction: Prediction, draw: ImageDraw.ImageDraw, font: Font) -> list[str]:
    lines = []
    for note in prediction.notes:
        words, line = note.split(), ""
        for word in words:
            if line and draw.textlength(f"{line} {word}", font=font) > 960:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        if line:
            lines.append(line)
    return lines


def render_page(
    volume: Volume,
    prediction: Prediction,
    card: ModelCard,
    volumes_mm3: Mapping[str, float],
) -> np.ndarray:
    """Draw the report page.

    Parameters
    ----------
    volume : aenode.records.Volume
        The reference volume (key slices and study identifiers).
    prediction : aenode.records.Prediction
        Its label map is overlaid; its classifier ``findings`` are listed (the input's
        central planes shown).
    card : aenode.infer.cards.ModelCard
        Name, version, description, labels (colours) and classes.
    volumes_mm3 : Mapping[str, float]
        Volume per label name.

    Returns
    -------
    numpy.ndarray
        RGB page, uint8, shape (768, 1024, 3).
    """
    page = Image.new("RGB", PAGE_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(page)
    title, body, small = _font(28, bold=True), _font(18), _font(14)
    ds = volume.datasets[0] if volume.datasets else None

    def tag(keyword: str) -> str:
        return read_text(ds, keyword)

    draw.text((30, 20), f"AI result: {card.name} {card.version}", fill=(0, 0, 0), font=title)
    description = card.description
    if draw.textlength(description, font=small) > 960:
        words = description.split()
        while words and draw.textlength(" ".join(words) + " ...", font=small) > 960:
            words.pop()
        description = " ".join(words) + " ..."
    draw.text((30, 60), description, fill=(60, 60, 60), font=small)
    ids = [
        f"Patient: {tag('PatientName')}  ID: {tag('PatientID')}",
        f"Study date: {tag('StudyDate')}  Accession: {tag('AccessionNumber')}",
        f"Study UID: {volume.series.study_uid}",
        f"Series: {volume.series.description or '-'} ({volume.series.series_uid})",
    ]
    for i, line in enumerate(ids):
        draw.text((30, 88 + 20 * i), line[:130], fill=(0, 0, 0), font=small)

    y = 180
    draw.text((30, y), "Findings", fill=(0, 0, 0), font=_font(20, bold=True))
    y += 32
    for spec in card.outputs.labels:
        mm3 = volumes_mm3.get(spec.name, 0.0)
        draw.rectangle((30, y + 3, 44, y + 17), fill=tuple(spec.color))
        draw.text(
            (54, y),
            f"{spec.name}: {mm3:,.0f} mm\u00b3 ({mm3 / 1000:.2f} mL)",
            fill=(0, 0, 0),
            font=body,
        )
        y += 26
    if len(card.outputs.labels) > 1:
        total = sum(volumes_mm3.get(s.name, 0.0) for s in card.outputs.labels)
        draw.text(
            (54, y),
            f"total: {total:,.0f} mm\u00b3 ({total / 1000:.2f} mL)",
            font=body,
            fill=(0, 0, 0),
        )
        y += 26
    shown = {f.name for f in findings_of(prediction, card)}  # not twice: finding, measurement
    for line in _finding_lines(prediction, card) + _measurement_lines(prediction, shown):
        draw.text((54, y), line[:110], fill=(0, 0, 0), font=body)
        y += 26
    if prediction.task == "classification":  # e.g. the geometry correction, the key slabs
        for line in _note_lines(prediction, draw, small)[:8]:
            draw.text((30, y), line, fill=(60, 60, 60), font=small)
            y += 17

    window = prediction.display_window
    if prediction.labels is not None and card.outputs.labels:
        masks = label_masks(prediction, card.outputs.labels, volume)
        image = sitk.GetArrayViewFromImage(volume.image).astype(np.float32)
        colors = [spec.color for spec in card.outputs.labels]
        extra = _display_images(prediction, volume)
        chosen = sorted({k for k in prediction.key_slices if 0 <= k < masks.shape[0]})
        slices = chosen[:3] or key_slices(masks)
        if extra:  # several images per slice: fewer slices, so that the tiles stay legible
            slices = slices[:2] if len(slices) > 1 else slices
            caption = volume.series.description or prediction.reference_role
            columns = [(caption[:24], image), *extra]
            _slice_grid(page, draw, y + 8, columns, slices, masks, colors, window)
        else:
            x = 30
            edge = max(60, min(_TILE, PAGE_SIZE[1] - 60 - (y + 30)))
            for idx in slices:
                tile = _tile(image[idx], masks[idx], colors, window=window, edge=edge)
                page.paste(tile, (x, y + 30))
                draw.text(
                    (x, y + 8), f"slice {idx + 1} of {masks.shape[0]}", fill=(0, 0, 0), font=small
                )
                x += edge + 20
    elif card.task == "classification":
        x = 30
        edge = max(60, min(_TILE, PAGE_SIZE[1] - 60 - (y + 30)))
        for caption, plane in key_planes(volume, prediction) or central_planes(volume):
            tile = _tile(plane, np.zeros((*plane.shape, 0), bool), [], window=window, edge=edge)
            page.paste(tile, (x, y + 30))
            draw.text((x, y + 8), caption, fill=(0, 0, 0), font=small)
            x += edge + 20

    draw.rectangle((0, PAGE_SIZE[1] - 50, PAGE_SIZE[0], PAGE_SIZE[1]), fill=(180, 0, 0))
    draw.text((30, PAGE_SIZE[1] - 40), DISCLAIMER, fill=(255, 255, 255), font=body)
    draw.text((PAGE_SIZE[0] - 140, 20), f"aenode {__version__}", fill=(120, 120, 120), font=small)
    return np.asarray(page, dtype=np.uint8).copy()


def _orientation(volume: Volume) -> tuple[str, str]:
    direction = np.asarray(volume.image.GetDirection(), dtype=float).reshape(3, 3)
    letters = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, +y, +z in LPS

    def letter(vector: np.ndarray) -> str:
        axis = int(np.abs(vector).argmax())
        return letters[axis][0] if vector[axis] > 0 else letters[axis][1]

    return letter(direction[:, 0]), letter(direction[:, 1])


def build_report(
    volume: Volume,
    prediction: Prediction,
    card: ModelCard,
    settings: ResultsSettings,
    volumes_mm3: Mapping[str, float],
    *,
    page: np.ndarray | None = None,
    uids: ResultUids | None = None,
) -> hd.sc.SCImage:
    """Build the secondary-capture report of one prediction.

    Parameters
    ----------
    volume, prediction, card, volumes_mm3
        As for :func:`render_page`.
    settings : aenode.config.ResultsSettings
        ``series_number_base`` (+2), ``series_description``, ``manufacturer``.
    page : numpy.ndarray or None
        An already rendered page; rendered here when None.
    uids : ResultUids or None
        The job's deterministic UIDs (:mod:`aenode.results.uids`); None makes random ones.

    Returns
    -------
    highdicom.sc.SCImage
        RGB, 8 bits, Explicit VR Little Endian, in the source study, a new series.
    """
    if page is None:
        page = render_page(volume, prediction, card, volumes_mm3)
    ref = reference_datasets(volume)[0]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=page,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids.series("report") if uids else hd.UID(),
        series_number=settings.series_number_base + REPORT_SERIES_OFFSET,
        sop_instance_uid=uids.sop("report") if uids else hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        patient_orientation=_orientation(volume),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description=series_description(settings, card, "report"),
        manufacturer_model_name=card.name[:64],
        software_versions=software_versions(card),
        institution_name=settings.institution_name,
    )
    sc.Laterality = ""
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = DISCLAIMER[:10240]
    return sc
