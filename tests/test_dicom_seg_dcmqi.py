"""dcmqi, the reference DICOM-SEG toolkit (3D Slicer's), reads our SEG without a warning and gives
back our labels voxel for voxel (issue 20: ContentCreatorName, type 2, was missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import samed_adapter as sa
from samed_adapter.testing.cli import run
from samed_adapter.testing import random_adapter

# pip puts the command beside this interpreter, which need not be on PATH (a venv not activated).
SEGIMAGE2ITKIMAGE = shutil.which("segimage2itkimage") or shutil.which("segimage2itkimage",
                                                                       path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(SEGIMAGE2ITKIMAGE is None, reason="dcmqi's segimage2itkimage is not on PATH nor "
                                "beside this Python (pip install dcmqi, part of samed-adapter[test])")


def test_dcmqi_reads_our_seg_without_a_warning_and_gives_back_our_labels(ct_folder, tmp_path, capsys):
    sam = sa.build_sam("tiny", seed=0)
    config = sa.AdapterConfig(num_classes=3, image_size=64, intensity_window=None,
                              intensity_percentiles=(1.0, 99.0), class_names=["liver", "spleen", "right kidney"])
    adapter = random_adapter(sam, config, seed=4, scale=0.5).save(tmp_path / "a.safetensors")
    out = tmp_path / "out"
    code, _, err = run(capsys, "segment", "--sam-backbone", "tiny", "--random-sam-seed", "0", "--adapter",
                       str(adapter), str(ct_folder), "-o", str(out), "--output-type", "nifti,dicom-seg")
    assert code == 0, err
    assert "UserWarning" not in err, err  # highdicom's, had the creator's name been misencoded
    ours = nib.load(out / "ct.nii.gz")
    labels = np.asarray(ours.dataobj)
    present = sorted(set(np.unique(labels).tolist()) - {0})
    assert len(present) >= 2, "the random adapter should predict at least two classes here"

    read = tmp_path / "dcmqi"
    read.mkdir()
    done = subprocess.run([SEGIMAGE2ITKIMAGE, "--inputDICOM", str(out / "ct_seg.dcm"), "--outputDirectory",
                           str(read), "--outputType", "nifti"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    log = done.stdout + done.stderr
    assert "W:" not in log and "E:" not in log and "warning" not in log.lower(), log

    meta = json.loads((read / "meta.json").read_text())
    segments = [s for group in meta["segmentAttributes"] for s in group]
    assert [s["SegmentLabel"] for s in segments] == ["liver", "spleen", "right kidney"]
    for number, segment in enumerate(segments, start=1):
        theirs = nib.load(read / f"{number}.nii.gz")
        np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3)  # the same grid, read back
        mask = np.asarray(theirs.dataobj) > 0
        np.testing.assert_array_equal(mask, labels == number, err_msg=segment["SegmentLabel"])
