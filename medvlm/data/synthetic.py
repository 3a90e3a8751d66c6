"""Deterministic synthetic radiology data: images whose findings are visible in the pixels,
templated closed/open questions about them, and a short findings report.

Findings per image: pulmonary nodules (count 0-3, all on one side), pleural effusion (none,
left, right), enlarged heart (yes/no); modality style x-ray / CT / MRI. Sides are the
*patient's* sides drawn in radiological convention (patient left = image right).

Hospital profiles vary scanner contrast, noise, intensity inversion, disease prevalence and
modality mix, so hospitals are non-IID. The ``public`` profile is the corpus the built-in
foundation models are pretrained on; it uses a seed stream disjoint from every hospital.

Knowledge only the hospitals hold: a **pneumothorax** (one lung partly collapsed: a dark rim of
air without lung, the collapsed lung brighter, a thin bright pleural line) and an implanted
**pacemaker** (a bright metal box in the upper chest wall with a lead to the heart). The public
corpus has neither finding, never asks about them and never names them in a report; the hospitals
hold them in different shares (``HOSPITAL_ONLY_QTYPES``; the README has the table), so no hospital
alone has many cases and one (oncology) has no pacemaker at all. They exist with
``data.hospital_only=true`` (the ``tiny-consortium`` preset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
MODALITIES = ("x-ray", "ct", "mri")
NUMBER_WORDS = ("no", "one", "two", "three")


@dataclass(frozen=True)
class HospitalProfile:
    name: str
    modality_mix: tuple[float, float, float]  # P(x-ray), P(ct), P(mri)
    p_nodule: float
    p_effusion: float
    p_cardiomegaly: float
    contrast: float = 1.0      # gamma applied to intensities (scanner/post-processing)
    noise: float = 0.04        # std of additive Gaussian noise (intensity in [0, 1])
    p_invert: float = 0.0      # probability an image is stored inverted (MONOCHROME1-like)
    stream: int = 0            # seed stream: hospitals never share one with the public corpus
    p_pneumothorax: float = 0.0   # hospital-only findings (data.hospital_only; never in the public corpus)
    p_device: float = 0.0


PROFILES: dict[str, HospitalProfile] = {
    p.name: p
    for p in (
        HospitalProfile("general", (0.7, 0.2, 0.1), 0.35, 0.3, 0.3, 1.0, 0.04, 0.0, stream=1,
                        p_pneumothorax=0.35, p_device=0.2),
        HospitalProfile("oncology", (0.2, 0.7, 0.1), 0.7, 0.25, 0.15, 0.8, 0.05, 0.0, stream=2,
                        p_pneumothorax=0.3, p_device=0.0),
        HospitalProfile("cardiac", (0.4, 0.1, 0.5), 0.2, 0.45, 0.65, 1.25, 0.03, 0.3, stream=3,
                        p_pneumothorax=0.15, p_device=0.45),
        HospitalProfile("rural", (0.9, 0.1, 0.0), 0.35, 0.35, 0.35, 1.1, 0.09, 0.1, stream=4,
                        p_pneumothorax=0.25, p_device=0.1),
        HospitalProfile("imaging", (0.2, 0.4, 0.4), 0.45, 0.35, 0.35, 0.9, 0.03, 0.05, stream=5,
                        p_pneumothorax=0.2, p_device=0.3),
        HospitalProfile("public", (0.34, 0.33, 0.33), 0.5, 0.5, 0.5, 1.0, 0.05, 0.15, stream=1000),
    )
}


@dataclass(frozen=True)
class Findings:
    modality: str
    nodules: int          # 0..3
    nodule_side: str      # "left" | "right" | "" when no nodules
    effusion: str         # "none" | "left" | "right"
    cardiomegaly: bool
    pneumothorax: str = "none"   # "none" | "left" | "right": hospital-only
    device: bool = False         # an implanted pacemaker: hospital-only

    def abnormalities(self) -> list[str]:
        out = []
        if self.nodules:
            out.append("nodule")
        if self.effusion != "none":
            out.append("pleural effusion")
        if self.cardiomegaly:
            out.append("enlarged heart")
        return out


@dataclass
class SyntheticSet:
    """Images plus question rows that reference them by index."""

    images: np.ndarray                      # (N, H, W) uint8
    findings: list[Findings]
    rows: list[dict] = field(default_factory=list)  # image_index, question, answer, answer_type, qtype, report

    def subset(self, image_indices: list[int]) -> "SyntheticSet":
        keep = {old: new for new, old in enumerate(image_indices)}
        rows = [dict(r, image_index=keep[r["image_index"]]) for r in self.rows if r["image_index"] in keep]
        return SyntheticSet(self.images[image_indices], [self.findings[i] for i in image_indices], rows)


# ----------------------------------------------------------------------------- findings
def sample_findings(rng: np.random.Generator, profile: HospitalProfile) -> Findings:
    modality = MODALITIES[int(rng.choice(3, p=np.asarray(profile.modality_mix) / sum(profile.modality_mix)))]
    nodules = int(rng.integers(1, 4)) if rng.random() < profile.p_nodule else 0
    nodule_side = ("left", "right")[int(rng.integers(2))] if nodules else ""
    effusion = ("left", "right")[int(rng.integers(2))] if rng.random() < profile.p_effusion else "none"
    cardiomegaly = bool(rng.random() < profile.p_cardiomegaly)
    # hospital-only findings draw nothing where they cannot occur: the public stream stays as it was
    pneumothorax = ("none" if not profile.p_pneumothorax or rng.random() >= profile.p_pneumothorax
                    else ("left", "right")[int(rng.integers(2))])
    device = bool(profile.p_device and rng.random() < profile.p_device)
    return Findings(modality, nodules, nodule_side, effusion, cardiomegaly, pneumothorax, device)


# ----------------------------------------------------------------------------- rendering
def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def render(findings: Findings, rng: np.random.Generator, profile: HospitalProfile,
           size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one image (H, W) uint8. Patient left is image right (radiological convention)."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    jitter = lambda scale: float(rng.normal(0, scale))  # noqa: E731 - small positional jitter
    style = findings.modality
    # tissue intensities per modality style: background, body, lung, heart, fluid, nodule
    tones = {
        "x-ray": (0.02, 0.55, 0.12, 0.85, 0.8, 0.95),
        "ct": (0.0, 0.45, 0.05, 0.65, 0.55, 0.9),
        "mri": (0.05, 0.35, 0.15, 0.5, 0.95, 0.75),
    }[style]
    bg, body_t, lung_t, heart_t, fluid_t, nod_t = tones
    img = np.full((size, size), bg, np.float32)
    cy, cx = s * 0.52 + jitter(1.0), s * 0.5 + jitter(1.0)
    if style == "x-ray":   # frontal chest: tall lungs, heart low and to patient's left
        img[_ellipse(yy, xx, cy, cx, s * 0.46, s * 0.44)] = body_t
        lung_ry, lung_rx, lung_dy, lung_dx = s * 0.32, s * 0.15, -s * 0.02, s * 0.19
    else:                  # axial slice: round body, lungs side by side, heart anterior
        img[_ellipse(yy, xx, cy, cx, s * 0.40, s * 0.47)] = body_t
        lung_ry, lung_rx, lung_dy, lung_dx = s * 0.24, s * 0.17, s * 0.0, s * 0.2
    # image-left lung = patient's right; image-right lung = patient's left
    lung_centres = {"right": (cy + lung_dy, cx - lung_dx), "left": (cy + lung_dy, cx + lung_dx)}
    lung_masks = {}
    for side, (ly, lx) in lung_centres.items():
        m = _ellipse(yy, xx, ly, lx, lung_ry, lung_rx)
        lung_masks[side] = m
        img[m] = lung_t
    if style == "mri":  # soft texture inside the body
        img += 0.06 * np.sin(xx / 2.5 + jitter(1)) * np.cos(yy / 3.1) * (img > bg + 0.01)
    # heart: larger radius when enlarged
    hr = s * (0.2 if findings.cardiomegaly else 0.13) * (1 + jitter(0.04))
    hy = cy + (s * 0.12 if style == "x-ray" else -s * 0.12)
    hx = cx + s * 0.05
    img[_ellipse(yy, xx, hy, hx, hr * 0.9, hr)] = heart_t
    # The hospital-only findings are drawn before the effusion and the nodules, which are drawn over them:
    # a collapsed lung or a pacemaker never hides a finding its labels name (until December 6 they were
    # drawn last and erased the nodules and the fluid of the lung they lay on).
    if findings.pneumothorax != "none":   # the lung collapses towards the hilum: air rim, pleural line
        ly, lx = lung_centres[findings.pneumothorax]
        towards = -1.0 if findings.pneumothorax == "right" else 1.0     # lateral side of that lung
        shrink = rng.uniform(0.5, 0.65)
        cy2, cx2 = ly + lung_ry * (1 - shrink) * 0.5, lx - towards * lung_rx * (1 - shrink) * 0.6
        collapsed = _ellipse(yy, xx, cy2, cx2, lung_ry * shrink, lung_rx * shrink)
        rim = lung_masks[findings.pneumothorax] & ~collapsed
        img[rim] = bg
        line = _ellipse(yy, xx, cy2, cx2, lung_ry * shrink + 1.0, lung_rx * shrink + 1.0) & ~collapsed
        img[line & lung_masks[findings.pneumothorax]] = 0.75
        img[collapsed & lung_masks[findings.pneumothorax]] = min(1.0, lung_t + 0.25)
    if findings.device:                    # pacemaker below the patient's left clavicle, lead to the heart
        dy, dx = cy - s * (0.3 if style == "x-ray" else 0.32), cx + s * 0.27
        box_h, box_w = s * 0.045, s * 0.07
        box = (np.abs(yy - dy) <= box_h) & (np.abs(xx - dx) <= box_w)
        img[box] = 1.0
        for t in np.linspace(0.0, 1.0, 40):
            y, x = int(round(dy + t * (hy - dy))), int(round(dx + t * (hx - dx)))
            if 0 <= y < size and 0 <= x < size:
                img[y, x] = 0.95
    # pleural effusion: fluid filling the dependent part of one lung
    if findings.effusion != "none":
        ly, lx = lung_centres[findings.effusion]
        level = ly + lung_ry * (0.15 if style == "x-ray" else 0.05) + jitter(1.0)
        fluid = lung_masks[findings.effusion] & (yy > level)
        img[fluid] = fluid_t
    # nodules: bright round opacities within one lung, away from the fluid
    if findings.nodules:
        ly, lx = lung_centres[findings.nodule_side]
        placed: list[tuple[float, float]] = []
        nodule_r_max = s * 0.075
        for _ in range(findings.nodules):
            for _attempt in range(50):
                ny = ly + rng.uniform(-0.75, 0.15) * lung_ry
                nx = lx + rng.uniform(-0.45, 0.45) * lung_rx
                clear_of_device = not findings.device or (abs(ny - dy) > box_h + nodule_r_max
                                                          or abs(nx - dx) > box_w + nodule_r_max)
                if clear_of_device and all((ny - py) ** 2 + (nx - px) ** 2 > (s * 0.15) ** 2 for py, px in placed):
                    break
            placed.append((ny, nx))
            r = s * rng.uniform(0.055, 0.075)   # at most nodule_r_max
            img[_ellipse(yy, xx, ny, nx, r, r)] = nod_t
    # scanner: contrast curve, inversion, noise
    img = np.clip(img, 0.0, 1.0) ** profile.contrast
    if rng.random() < profile.p_invert:
        img = 1.0 - img
    img = img + rng.normal(0.0, profile.noise, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- text
def report_text(f: Findings) -> str:
    parts = [f"{f.modality} of the chest."]
    if f.nodules:
        noun = "nodule" if f.nodules == 1 else "nodules"
        parts.append(f"{NUMBER_WORDS[f.nodules]} {noun} in the {f.nodule_side} lung.")
    if f.effusion != "none":
        parts.append(f"{f.effusion} pleural effusion.")
    if f.cardiomegaly:
        parts.append("the heart is enlarged.")
    if f.pneumothorax != "none":
        parts.append(f"{f.pneumothorax} pneumothorax.")
    if f.device:
        parts.append("a pacemaker is in place.")
    if len(parts) == 1:
        parts.append("no acute findings.")
    return " ".join(parts)


HOSPITAL_ONLY_QTYPES = ("pneumothorax", "device")
# every question type :func:`questions` asks (what data.qtypes / a stage's qtypes may name for the synthetic data)
QTYPES = ("effusion", "cardiomegaly", "nodule", "count", "modality", "abnormality", "nodule_side",
          "nodule_description", "effusion_location", *HOSPITAL_ONLY_QTYPES)


def questions(f: Findings, *, hospital_only: bool = False) -> list[tuple[str, str, str, str]]:
    """(question, answer, answer_type, qtype) for one image's findings; ``hospital_only`` adds the
    questions the public corpus never asks (``HOSPITAL_ONLY_QTYPES``)."""
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    out = [
        ("is there a pleural effusion?", yn(f.effusion != "none"), "closed", "effusion"),
        ("is the heart enlarged?", yn(f.cardiomegaly), "closed", "cardiomegaly"),
        ("are there any nodules?", yn(f.nodules > 0), "closed", "nodule"),
        ("how many nodules are there?", str(f.nodules), "closed", "count"),
        ("is this an x-ray, a ct or an mri?", f.modality, "closed", "modality"),
        ("what abnormality is seen?", " and ".join(f.abnormalities()) or "no finding", "open", "abnormality"),
    ]
    if f.nodules:
        out.append(("which lung has the nodule?", f.nodule_side, "closed", "nodule_side"))
        out.append(("describe the nodules.", f"{NUMBER_WORDS[f.nodules]} in the {f.nodule_side} lung", "open",
                    "nodule_description"))
    if f.effusion != "none":
        out.append(("where is the effusion?", f"{f.effusion} lung base", "open", "effusion_location"))
    if hospital_only:
        out.append(("is there a pneumothorax?", yn(f.pneumothorax != "none"), "closed", "pneumothorax"))
        out.append(("is there a pacemaker?", yn(f.device), "closed", "device"))
    return out


def public_corpus_text(findings: list[Findings]) -> list[str]:
    """Text the tiny LM is pretrained on: reports and question/answer lines (public corpus)."""
    lines = []
    for f in findings:
        lines.append(report_text(f))
        for q, a, _, _ in questions(f):
            lines.append(f"question: {q} answer: {a}")
    return lines


HOSPITAL_PROFILES = ("general", "oncology", "cardiac", "rural", "imaging")


def resolve_profile(name: str) -> HospitalProfile:
    """A profile by name; ``<profile>-<k>`` is the k-th site like that profile (same scanner and
    case mix, its own patients: a seed stream of its own), for federations of many hospitals."""
    if name in PROFILES:
        return PROFILES[name]
    base, _, k = name.rpartition("-")
    if base in HOSPITAL_PROFILES and k.isdigit():
        return replace(PROFILES[base], name=name, stream=10_000 * PROFILES[base].stream + int(k) + 1)
    raise ValueError(f"unknown hospital profile {name!r}: use one of {sorted(PROFILES)}, or <profile>-<k> "
                     f"(e.g. oncology-7) for the k-th site like one of {list(HOSPITAL_PROFILES)}")


def site_names(n: int) -> list[str]:
    """``n`` hospitals cycling through the profiles: general-0, oncology-0, ..., general-1, ..."""
    return [f"{HOSPITAL_PROFILES[i % len(HOSPITAL_PROFILES)]}-{i // len(HOSPITAL_PROFILES)}" for i in range(n)]


# ----------------------------------------------------------------------------- generation
def generate_hospital(profile: str | HospitalProfile, num_images: int, *, seed: int = 0,
                      size: int = IMAGE_SIZE, hospital_only: bool = False) -> SyntheticSet:
    """Generate one hospital's images and questions, deterministically from (profile, seed).
    ``hospital_only``: with the findings and questions the public corpus lacks (pneumothorax,
    pacemaker) at the profile's prevalence; without it, the data are exactly as before they existed."""
    if isinstance(profile, str):
        profile = resolve_profile(profile)
    if not hospital_only:
        profile = replace(profile, p_pneumothorax=0.0, p_device=0.0)
    root = np.random.SeedSequence([seed, profile.stream])
    images = np.empty((num_images, size, size), np.uint8)
    findings, rows = [], []
    for i, child in enumerate(root.spawn(num_images)):
        rng = np.random.default_rng(child)
        f = sample_findings(rng, profile)
        images[i] = render(f, rng, profile, size)
        findings.append(f)
        report = report_text(f)
        for q, a, atype, qtype in questions(f, hospital_only=hospital_only):
            rows.append({"image_index": i, "question": q, "answer": a, "answer_type": atype,
                         "qtype": qtype, "report": report, "modality": f.modality})
    return SyntheticSet(images, findings, rows)


def split_images(n: int, *, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Split image indices (never questions: one image's questions stay in one split)."""
    order = np.random.default_rng(seed + 7919).permutation(n).tolist()
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def write_dicom(image: np.ndarray, path: Path, *, modality: str = "CT", uid_seed: str = "") -> None:
    """An 8-bit grey image as a 12-bit CT-style DICOM file whose own rescale and window tags give
    the same picture back (stored = 4 * grey; HU = stored - 1024; window -514 / 1020)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed or str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = {"ct": "CT", "mri": "MR", "x-ray": "DX"}.get(modality.lower(), "OT")
    ds.PatientID = "SYNTHETIC"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = -514, 1020
    ds.PixelData = (image.astype(np.uint16) * 4).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_manifest(ds: SyntheticSet, directory: str | Path, *, name: str = "manifest.jsonl",
                   image_format: str = "png") -> Path:
    """Write the images (PNG, or DICOM with ``image_format="dicom"``) and a JSONL manifest (image
    paths relative to the manifest)."""
    from PIL import Image

    if image_format not in ("png", "dicom"):
        raise ValueError(f"image_format {image_format!r}: use png or dicom")
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    suffix = ".png" if image_format == "png" else ".dcm"
    modality = {r["image_index"]: r["modality"] for r in ds.rows}
    for i, img in enumerate(ds.images):
        target = directory / "images" / f"{i:05d}{suffix}"
        if image_format == "png":
            Image.fromarray(img, mode="L").save(target)
        else:
            write_dicom(np.asarray(img), target, modality=modality.get(i, "OT"), uid_seed=f"{directory.name}/{i}")
    path = directory / name
    with path.open("w") as fh:
        for r in ds.rows:
            row = {"image": f"images/{r['image_index']:05d}{suffix}", "question": r["question"],
                   "answer": r["answer"], "answer_type": r["answer_type"], "qtype": r["qtype"],
                   "report": r["report"], "modality": r["modality"]}
            fh.write(json.dumps(row) + "\n")
    return path
