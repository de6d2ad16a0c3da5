"""The clusters file: every kind of mistake is refused with file, line and a fix."""
import pytest

from scipion_cloudexec.config import ConfigError, default_config_path, load_clusters, parse_clusters

GOOD = """\
[cluster gpu-cloud]
host = 203.0.113.7
user = alice
identity_file = ~/.ssh/id_ed25519
workdir = /scratch/alice/cloudexec
python = /opt/venv/bin/python
launcher = slurm
slots = 64
gpus = 0, 1
srun = srun --mpi=pmix
partition = gpu
env_setup =
    module load openmpi
    module load relion

[cluster box]
host = box.lab
port = 2222
user = bob
identity_file = /home/bob/.ssh/id_ed25519
known_hosts = /home/bob/.ssh/known_hosts
workdir = /data/cx
python = python3
launcher = mpirun
slots = 8
mpirun = mpirun --bind-to none
hosts = node1:4 node2:4
"""


def test_good_file_parses_every_key():
    c = parse_clusters(GOOD, "clusters.conf")
    g, b = c["gpu-cloud"], c["box"]
    assert (g.host, g.port, g.launcher, g.slots, g.gpus) == ("203.0.113.7", 22, "slurm", 64, (0, 1))
    assert g.srun == ("srun", "--mpi=pmix") and g.partition == "gpu"
    assert g.env_setup.splitlines() == ["module load openmpi", "module load relion"]
    assert g.identity_file.endswith("/.ssh/id_ed25519") and not g.identity_file.startswith("~")
    assert g.known_hosts.endswith("/.ssh/known_hosts")
    assert (b.port, b.mpirun, b.hosts) == (2222, ("mpirun", "--bind-to", "none"),
                                           ("node1:4", "node2:4"))
    assert g.heartbeat == 2.0 and b.agent_idle_timeout == 3600.0


@pytest.mark.parametrize("text, expected", [
    (GOOD.replace("slots = 64", "slots = 64\nslot = 3"),
     ["clusters.conf:9:", "unknown key 'slot'", "Did you mean 'slots'?"]),
    (GOOD.replace("python = /opt/venv/bin/python\n", ""),
     ["clusters.conf:1:", "lacks required key python", "python = "]),
    (GOOD.replace("slots = 64", "slots = many"),
     ["clusters.conf:8:", "slots = 'many'", "must be a number", "slots = 32"]),
    (GOOD.replace("slots = 64", "slots = 0"), ["clusters.conf:8:", "greater than 0"]),
    (GOOD.replace("launcher = slurm", "launcher = pbs"),
     ["clusters.conf:7:", "must be one of: mpirun, slurm, local"]),
    (GOOD.replace("port = 2222", "port = 70000"), ["clusters.conf:18:", "between 1 and 65535"]),
    (GOOD.replace("gpus = 0, 1", "gpus = first"), ["clusters.conf:9:", "GPU numbers"]),
    (GOOD.replace("[cluster box]", "[cluster gpu-cloud]"),
     ["clusters.conf:16:", "[cluster gpu-cloud] appears twice"]),
    (GOOD.replace("slots = 8", "slots = 8\nslots = 9"), ["clusters.conf:26:", "'slots' appears twice"]),
    (GOOD.replace("[cluster box]", "[box]"), ["clusters.conf:16:", "write [cluster NAME]"]),
    (GOOD.replace("workdir = /data/cx", "workdir = data/cx"),
     ["clusters.conf:22:", "must be an absolute path"]),
    (GOOD.replace("host = box.lab", "host ="), ["clusters.conf:17:", "host is empty"]),
    ("# nothing here\n", ["no cluster defined"]),
    ("host = x\n", ["not a valid INI file"]),
])
def test_wrong_files_are_refused_with_place_and_fix(text, expected):
    with pytest.raises(ConfigError) as e:
        parse_clusters(text, "clusters.conf")
    for part in expected:
        assert part in str(e.value)


def test_missing_file_says_how_to_create_it(tmp_path):
    with pytest.raises(ConfigError, match="clusters file not found.*\\[cluster NAME\\]"):
        load_clusters(str(tmp_path / "nope.conf"))


def test_config_path_order(tmp_path, monkeypatch):
    monkeypatch.delenv("SCIPION_CLOUDEXEC_CONFIG", raising=False)
    monkeypatch.delenv("SCIPION_HOME", raising=False)
    with pytest.raises(ConfigError, match="--config FILE"):
        default_config_path()
    monkeypatch.setenv("SCIPION_HOME", str(tmp_path))
    assert default_config_path() == str(tmp_path / "config" / "cloudexec.conf")
    monkeypatch.setenv("SCIPION_CLOUDEXEC_CONFIG", "/env/file.conf")
    assert default_config_path() == "/env/file.conf"
    assert default_config_path("/cli/file.conf") == "/cli/file.conf"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "cloudexec.conf").write_text(GOOD)
    monkeypatch.delenv("SCIPION_CLOUDEXEC_CONFIG")
    assert set(load_clusters()) == {"gpu-cloud", "box"}


def test_groups_name_clusters_used_together():
    from scipion_cloudexec.config import parse_groups
    text = GOOD + "\n[group everywhere]\nclusters = gpu-cloud, box\n"
    clusters = parse_clusters(text, "clusters.conf")
    assert set(clusters) == {"gpu-cloud", "box"}, "a group is not a cluster"
    assert parse_groups(text, clusters, "clusters.conf") == {"everywhere": ["gpu-cloud", "box"]}
    bad = GOOD + "\n[group g]\nclusters = box, nowhere\n"
    with pytest.raises(ConfigError, match="clusters.conf:29:.*unknown cluster.*nowhere"):
        parse_groups(bad, parse_clusters(bad, "clusters.conf"), "clusters.conf")
    bad = GOOD + "\n[group g]\nmembers = box\n"
    with pytest.raises(ConfigError, match="takes one key, clusters"):
        parse_groups(bad, parse_clusters(bad, "clusters.conf"), "clusters.conf")
