"""Cut fixed-size labelled organ crops, OrganMNIST3D style, from CT volumes and their label maps.

Each CT and its label map go through the project's one CT preprocessing (RAS, 2 mm), with the
intensities kept in Hounsfield units; around each named structure (label ids with the same name in the
id -> name table are merged) the script cuts cubes of the given sides in voxels, centred on the
structure's bounding-box centre, plus jittered copies, and resizes each to ``--output-size``.
See ``dagman_components/clustering/crops.py`` for the exact geometry.

Outputs (each written atomically):

* ``--out-npz``: MedMNIST's organmnist3d layout (``train/val/test _images``, here int16 Hounsfield
  units so that the clustering bundle applies each encoder's own window from its model card;
  ``_labels`` (N, 1)), plus ``label_names`` and ``<split>_case_ids`` arrays. When every name is
  an OrganMNIST3D organ name (``liver``, ``kidney-right``, ...) the labels are OrganMNIST3D's ids
  0..10; otherwise they are 0..K-1 in table order.
* ``--out-nifti``: one ``.nii.gz`` per crop (float32 HU, with its world affine) and
  ``crops.csv`` (file, case_id, split, label, organ, size, jitter offset, centre, voxels).

Usage (from the repository root)::

    python scripts/make_organ_crops.py \\
        --image data/totalseg_example/example_ct_sm.nii.gz --label data/totalseg_example/example_seg.nii.gz \\
        --names bundles/dagman_organ_ct_clustering/configs/totalseg_to_organmnist3d.json --ignore-unnamed \\
        --sizes 24 32 40 --jitters-per-size 2 --max-jitter 3 --output-size 28 --out-npz crops.npz

Repeat ``--image/--label/--split`` (same count) to cut several CTs into one file.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import sys
from pathlib import Path

import numpy as np

if importlib.util.find_spec("dagman_components") is None:  # not installed: use the repository this script is in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dagman_components.atomic import atomic_write_bytes  # noqa: E402
from dagman_components.clustering import (  # noqa: E402
    ORGANMNIST3D_LABELS,
    SPLITS,
    OrganDataError,
    cut_organ_crops,
    load_ct_and_labels,
    read_name_table,
    save_organ_npz,
    write_csv,
)

#: Outside the CT (air), and the highest value kept (int16 storage; dense bone and metal are clipped).
AIR_HU, HU_MAX = -1024.0, 3071.0

logger = logging.getLogger("make_organ_crops")


def _class_ids(names: dict[int, str | None]) -> dict[str, int]:
    """Class id of every name: OrganMNIST3D's ids when all names are OrganMNIST3D organs, else 0..K-1."""
    ordered = list(dict.fromkeys(n for _, n in sorted(names.items()) if n))
    organ_ids = {v: k for k, v in ORGANMNIST3D_LABELS.items()}
    if all(n in organ_ids for n in ordered):
        return {n: organ_ids[n] for n in ordered}
    return {n: k for k, n in enumerate(ordered)}


def _uses_organmnist3d_ids(class_ids: dict[str, int]) -> bool:
    return all(ORGANMNIST3D_LABELS.get(i) == n for n, i in class_ids.items())


def _crop_affine(affine: np.ndarray, start: tuple[int, int, int], size: int, output_size: int) -> np.ndarray:
    """World affine of a crop of side ``size`` starting at ``start``, resized to ``output_size``."""
    scale = size / output_size
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(start, dtype=float) - 0.5 + 0.5 * scale  # voxel centres under align_corners=False
    zoom = np.diag([scale, scale, scale, 1.0])
    return affine @ shift @ zoom


def _save_nifti(image: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(image.astype(np.float32), affine)
    atomic_write_bytes(img.to_bytes() if not path.name.endswith(".gz") else _gzip(img.to_bytes()), path)


def _gzip(data: bytes) -> bytes:
    import gzip

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", action="append", required=True, type=Path, help="CT volume (repeatable)")
    parser.add_argument("--label", action="append", required=True, type=Path, help="its label map (repeatable)")
    parser.add_argument("--split", action="append", choices=SPLITS, help="split of each CT (default: test)")
    parser.add_argument("--names", required=True, type=Path, help="JSON id -> name table (same name merges ids)")
    parser.add_argument("--ignore-unnamed", action="store_true", help="skip label ids that the table does not name")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32], help="crop sides in voxels at --spacing")
    parser.add_argument("--output-size", type=int, default=32, help="side of every output crop (28 = OrganMNIST3D)")
    parser.add_argument("--jitters-per-size", type=int, default=0, help="extra jittered crops per structure and side")
    parser.add_argument("--max-jitter", type=int, default=0, help="largest jitter offset in voxels per axis")
    parser.add_argument("--min-voxels", type=int, default=1, help="skip structures with fewer voxels")
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 2.0], help="mm (the CT preprocessing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-npz", type=Path, help="organmnist3d-layout npz to write")
    parser.add_argument("--out-nifti", type=Path, help="folder for one NIfTI per crop and crops.csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    splits = args.split or ["test"] * len(args.image)
    if not len(args.image) == len(args.label) == len(splits):
        counts = f"{len(args.image)}, {len(args.label)}, {len(splits)}"
        parser.error(f"give as many --label (and --split) as --image: {counts}")
    if args.out_npz is None and args.out_nifti is None:
        parser.error("give --out-npz and/or --out-nifti")
    try:
        names = read_name_table(args.names)
        class_ids = _class_ids(names)
        images: dict[str, list] = {}
        labels: dict[str, list] = {}
        case_ids: dict[str, list] = {}
        rows: dict[str, list] = {}
        for k, (img_path, lab_path, split) in enumerate(zip(args.image, args.label, splits)):
            case = img_path.name.split(".")[0]
            image, label, affine = load_ct_and_labels(img_path, lab_path, spacing=args.spacing, hu_window=None)
            crops = cut_organ_crops(
                image,
                label,
                names,
                sizes=args.sizes,
                output_size=args.output_size,
                jitters_per_size=args.jitters_per_size,
                max_jitter=args.max_jitter,
                seed=args.seed + k,
                ignore_unnamed=args.ignore_unnamed,
                min_voxels=args.min_voxels,
                pad_value=AIR_HU,
                where=f"label map '{lab_path}'",
            )
            for c in crops:
                cid = f"{case}/{c.name}/s{c.size}/j{c.jitter_index}"
                images.setdefault(split, []).append(np.rint(np.clip(c.image, AIR_HU, HU_MAX)).astype(np.int16))
                labels.setdefault(split, []).append(class_ids[c.name])
                case_ids.setdefault(split, []).append(cid)
                if args.out_nifti is not None:
                    fname = cid.replace("/", "_") + ".nii.gz"
                    crop_affine = _crop_affine(affine, c.start, c.size, args.output_size)
                    _save_nifti(c.image, crop_affine, args.out_nifti / fname)
                    for key, value in {
                        "file": fname,
                        "case_id": cid,
                        "split": split,
                        "label": class_ids[c.name],
                        "organ": c.name,
                        "label_ids": " ".join(map(str, c.structure.ids)),
                        "size_vox": c.size,
                        "size_mm": " ".join(f"{c.size * s:g}" for s in args.spacing),
                        "jitter": " ".join(map(str, c.offset)),
                        "centre_vox": " ".join(map(str, c.structure.centre)),
                        "structure_voxels": c.structure.voxels,
                    }.items():
                        rows.setdefault(key, []).append(value)
    except OrganDataError as e:
        logger.error("%s", e)
        return 1
    if args.out_nifti is not None:
        write_csv(rows, args.out_nifti / "crops.csv")
        logger.info("wrote %d NIfTI crops and crops.csv to %s", len(rows["file"]), args.out_nifti)
    if args.out_npz is not None:
        organmnist3d = _uses_organmnist3d_ids(class_ids)
        save_organ_npz(
            args.out_npz,
            {s: np.stack(v) for s, v in images.items()},
            {s: np.asarray(v) for s, v in labels.items()},
            label_names=ORGANMNIST3D_LABELS if organmnist3d else {i: n for n, i in class_ids.items()},
            case_ids=case_ids,
        )
        counts = {s: len(v) for s, v in labels.items()}
        present = len({i for v in labels.values() for i in v})
        logger.info("wrote %s (%s crops of %d^3, %d classes)", args.out_npz, counts, args.output_size, present)
    return 0


if __name__ == "__main__":
    sys.exit(main())
