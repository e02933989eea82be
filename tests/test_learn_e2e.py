"""The learning loop end to end on real data (issue 32), as a site would run it.

An adapter trained on the quick start's MNI152 T1 (the session's ``trained`` fixture) serves the
same head in another contrast (:mod:`samed_adapter.testing.domains`: ``255 - T1`` inside the
head, white matter darker than grey). Through MONAI Label's own client, as 3D Slicer calls it:
the slabs are uploaded to the service's datastore, inferred by id, their corrected labels
submitted as ``final``, and ``/train`` started with the admin token. The job's new version must
be better on the held-out slabs, be swapped in, and the service must then answer with it: its
answers on the held-out slabs score higher than the first version's did.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("ray.train", reason="Ray Train is not installed: pip install 'samed-adapter[serve]'")
pytest.importorskip("monailabel", reason="MONAI Label's client is not installed")

from samed_adapter.evaluation.metrics import dice  # noqa: E402
from samed_adapter.learning.versions import VersionStore  # noqa: E402
from samed_adapter.segment.pipeline import SamSource  # noqa: E402
from samed_adapter.serve import ServeSettings, start  # noqa: E402
from samed_adapter.testing.domains import write_shifted_slabs  # noqa: E402

TOKEN, ADMIN = "site-token", "site-admin"


def _mean_dice(answer: Path, truth: Path) -> float:
    """Mean foreground Dice (percent) of a label file against the truth, both on the image's grid."""
    got, want = np.asarray(nib.load(answer).dataobj), np.asarray(nib.load(truth).dataobj)
    assert got.shape == want.shape
    return 100.0 * float(np.mean([dice(got == c, want == c) for c in (1, 2)]))


@pytest.fixture(scope="module")
def site(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ServeSettings(sam=SamSource(backbone="tiny", seed=0), adapter_files={"brain": str(trained["adapter"])},
                             port=port, token=TOKEN, admin_token=ADMIN, batch_wait_ms=2,
                             datastore=str(root / "datastore"))
    with start(settings) as server:
        yield {"server": server, "slabs": write_shifted_slabs(root / "shifted"), "root": root}


def test_corrected_labels_train_a_better_version_that_then_serves(site, tmp_path):
    from monailabel.client import MONAILabelClient

    server = site["server"]
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="slicer")
    client.update_auth(client.auth_token("admin", ADMIN))  # 3D Slicer's login, the admin token as password
    before: dict[str, float] = {}
    first = None
    for image_id, image, label in site["slabs"]:
        assert client.upload_image(str(image), image_id=image_id)["image"] == image_id
        answer, params = client.infer("brain", image_id, {})  # by id, as Slicer after its upload
        first = first or params["adapter"]["fingerprint"]
        assert params["adapter"]["fingerprint"] == first
        before[image_id] = _mean_dice(Path(answer), label)
        client.save_label(image_id, str(label), tag="final")  # the radiologist's corrected label

    start_s = time.monotonic()
    started = client.train_start("brain", {"max_epochs": 20, "seed": 0})
    assert started["status"] == "RUNNING"
    deadline = start_s + 600
    while (state := client.train_status())["status"] == "RUNNING":
        assert time.monotonic() < deadline, state
        time.sleep(1.0)
    job_s = time.monotonic() - start_s
    assert state["status"] == "DONE", state
    result = state["result"]
    figures = result["figures"]["holdout_dice"]
    print(f"\nheld-out Dice on the shifted domain: version 1 {figures['current']:.2f}, version 2 "
          f"{figures['new']:.2f}; the job took {job_s:.1f} s")
    assert result["serving"] and result["ref"] == "brain@2"
    assert figures["new"] > figures["current"] + 10.0

    version = VersionStore(server.settings.versions).get("brain", 2)
    held_out = set(version.holdout)
    trained_on = {item["image"] for item in version.items}
    assert held_out and not held_out & trained_on and held_out | trained_on == set(before)
    after = {}
    for image_id, _, label in site["slabs"]:
        if image_id in held_out:
            answer, params = client.infer("brain", image_id, {})
            assert params["adapter"]["fingerprint"] == version.fingerprint != first  # the new version answers
            after[image_id] = _mean_dice(Path(answer), label)
    # The service's answers on the held-out slabs: what the job's figures promised.
    assert np.mean(list(after.values())) > np.mean([before[i] for i in after]) + 10.0
    assert np.mean(list(after.values())) == pytest.approx(figures["new"], abs=1.0)
