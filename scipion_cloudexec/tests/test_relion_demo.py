"""The demo's workflow as a test: RELION 2D classification (scipion-em-relion 3.1, Debian's
RELION 3.1 with MPI) sent through the cloud executor to a host that cannot see the project,
checked against the same run done locally: as many classes, every particle assigned (to the
same class: both runs use one random seed), every iteration's files there, the same class
averages, and the RELION job really ran on that host with its MPI ranks."""
import os

import numpy as np
import pytest

from scipion_cloudexec.config import ClusterConfig
from scipion_cloudexec.demo import relion, synthetic
from scipion_cloudexec.tests.conftest import _stop_agent, leased_private_host
from scipion_cloudexec.tests.test_executor import logs, provenance, wait_done

PARTICLES, CLASSES, ITERATIONS, RANKS = 120, 3, 3, 2


@pytest.fixture(scope="module")
def relion_host(testbed, tmp_path_factory):
    """A private host of this module's own (name, bridge and /24 apart from the
    ``private_host`` fixture's), which sees the pytest base folder empty."""
    from scipion_cloudexec.testbed.private import PrivateHost
    why = relion.unavailable() or PrivateHost.unavailable()
    if why:
        pytest.skip(why)
    yield from leased_private_host(testbed, "r", hide=[str(tmp_path_factory.getbasetemp())],
                                   bridge="cxrbr0", net="10.84.0")


@pytest.fixture
def relion_cluster(relion_host, testbed, tmp_path):
    workdir = "%s/%s" % (relion_host.work, tmp_path.name)
    yield ClusterConfig(
        name="relionhost", host=relion_host.address, port=22, user=testbed.user,
        identity_file=testbed.client_key, known_hosts=relion_host.known_hosts,
        workdir=workdir, python=testbed.python, launcher="mpirun", slots=4, heartbeat=0.5,
        connect_timeout=5.0, source="<test>",
        mpirun=("mpirun", "--oversubscribe", "--bind-to", "none"))
    if relion_host.pid is not None:
        _stop_agent(relion_host.path(workdir))


@pytest.mark.slow
def test_relion_2d_on_a_private_host_matches_a_local_run(relion_cluster, relion_host,
                                                         clusters_env, new_project, tmp_path,
                                                         monkeypatch):
    home = relion.relion_home(create_in=str(tmp_path))
    assert home, "relion_refine_mpi is installed (checked by the fixture)"
    monkeypatch.setenv("RELION_HOME", home)
    clusters_env(relion_cluster)
    data = tmp_path / "data"
    volume = synthetic.test_volume(str(data / "volume.mrc"), 64, 3.0)
    stack = synthetic.project_particles(volume, str(data / "particles"), PARTICLES, 3.0)
    project = new_project("relion")
    parts = relion.import_particles(project, stack, 3.0)
    assert parts.outputParticles.getSize() == PARTICLES
    runs = []
    for queue in (None, relion_cluster.name):  # at once: each has one RELION follower rank
        prot = relion.classify2d(project, parts.outputParticles, CLASSES, ITERATIONS, RANKS,
                                 mask_diameter=150, label="cloud" if queue else "local",
                                 queue=queue)
        project.launchProtocol(prot, wait=False)
        runs.append(prot)
    local, cloud = [wait_done(project, prot, timeout=600) for prot in runs]
    assert local.isFinished(), logs(local)
    assert cloud.isFinished(), logs(cloud)

    seen = []
    for prot in (local, cloud):
        classes = prot.outputClasses
        assert classes.getSize() == CLASSES
        assignment = {p.getObjId(): c.getObjId() for c in classes.iterItems()
                      for p in c.iterItems()}
        assert sorted(assignment) == list(range(1, PARTICLES + 1)), "every particle in a class"
        assert relion.iteration_files(prot, ITERATIONS) == [], "every iteration's files"
        images, counts = relion.class_averages(prot)
        assert images.shape == (CLASSES, 64, 64) and sum(counts) == PARTICLES
        seen.append((assignment, images))
    assert sorted(os.listdir(cloud._getExtraPath())) == sorted(os.listdir(local._getExtraPath()))
    # the same random seed and MPI ranks: the same classes, wherever RELION ran
    assert seen[1][0] == seen[0][0], "each particle in the same class as in the local run"
    scale = float(np.abs(seen[0][1]).max())
    assert np.allclose(seen[1][1], seen[0][1], rtol=1e-5, atol=1e-5 * scale)

    # the RELION step ran on the private host, as an MPI job of RANKS ranks; the rest stayed
    records = provenance(cloud)
    assert [r["step"] for r in records] == [2], "only runRelionStep went to the cluster"
    assert records[0]["host"] == relion_host.address and records[0]["ranks"] == RANKS
    assert records[0]["exit_code"] == 0 and "relion_refine_mpi" in records[0]["command"]
    text = logs(cloud)
    assert "Number of MPI processes             = %d" % RANKS in text
    assert "runs on host            = %s" % relion_host.hostname in text
    assert not os.path.exists(os.path.join(local.getWorkingDir(), "logs", "cloudexec.jsonl"))


@pytest.mark.slow
@pytest.mark.bed  # the demo starts its own host and sshd
def test_the_demo_runs_end_to_end_and_stops_what_it_started(tmp_path):
    """The README's first command, small: exit 0, the steps ran on the demo's host, the PNG
    is written beside the project, and neither the host nor its namespace is left."""
    import subprocess
    import sys
    from scipion_cloudexec.demo.run import BRIDGE, HOST_NAME
    from scipion_cloudexec.testbed.private import PrivateHost
    why = relion.unavailable() or PrivateHost.unavailable()
    if why:
        pytest.skip(why)
    root = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "scipion_cloudexec.demo", "--root", str(root),
                        "--particles", "60", "--classes", "2", "--iterations", "2", "--mpi", "2"],
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "seen from cluster-demo: does not exist" in out
    assert "runRelionStep       cluster demo: cluster-demo" in out
    assert "RELION's log: 2 MPI processes, on host cluster-demo" in out
    assert "(60 of the 60 particles)" in out
    png = root / "desktop" / "projects" / "relion_demo-class-averages.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.access(root / "scipion-gui.sh", os.X_OK)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cxp-" + HOST_NAME not in netns.split()
    assert subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0


def test_montage_png_without_an_image_library_holds_the_pixels(tmp_path):
    images = np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32)
    grid = synthetic.montage_array(images, zoom=2)
    assert grid.shape == (4 + 32 + 4, 3 * (32 + 4) + 4)
    path = str(tmp_path / "m.png")
    synthetic.write_png_gray(path, grid)
    PIL = pytest.importorskip("PIL.Image")  # read back with an independent decoder
    assert np.array_equal(np.asarray(PIL.open(path)), grid)


def test_orientations_are_uniform_and_reproducible(tmp_path):
    a = synthetic.random_orientations(str(tmp_path / "a.star"), 2000, 3.0, 64, seed=5)
    b = synthetic.random_orientations(str(tmp_path / "b.star"), 2000, 3.0, 64, seed=5)
    assert open(a).read() == open(b).read()
    rows = [line.split() for line in open(a) if line.count(" ") == 3 and line[0].isdigit()]
    tilt = np.radians([float(r[1]) for r in rows])
    assert len(rows) == 2000 and abs(np.cos(tilt).mean()) < 0.05, "cos(tilt) uniform in [-1, 1]"
