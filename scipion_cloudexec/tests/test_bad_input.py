"""Bad input is refused where it is given, with a message naming it: job ids, environment
names and values, and desktop paths rewritten only where a path starts."""
import pytest

from scipion_cloudexec.agent.client import AgentClient
from scipion_cloudexec.agent.jobs import JobSpec
from scipion_cloudexec.executors.translate import PathMapper


@pytest.mark.parametrize("field,value,named", [
    ("job_id", "step-1\n", "job_id"),
    ("env", {"OMP\n": "1"}, "OMP"),
    ("env", {"X": 4}, "X"),
    ("env_prepend", {"PATH": None}, "PATH"),
])
def test_job_specs_with_bad_values_are_refused(field, value, named):
    spec = JobSpec(job_id="ok-1", argv=["true"])
    setattr(spec, field, value)
    with pytest.raises(ValueError, match=named):
        spec.validate()


def test_submit_refuses_a_non_string_environment_value_before_sending(cluster):
    client = AgentClient(cluster)  # never started: the refusal comes before any message
    with pytest.raises(ValueError, match="environment variable X"):
        client.submit(["true"], env={"X": 4})


def test_desktop_paths_are_rewritten_only_where_a_path_starts():
    m = PathMapper("/mnt/data/proj", "/scratch/mirror", "/usr/bin/python3",
                   [("/apps/x", "/opt/x")], local_python="/desk/python")
    assert m("/mnt/data/proj/Runs/1/a.mrc") == "/scratch/mirror/Runs/1/a.mrc"
    assert m("--i=/mnt/data/proj/a --o '/mnt/data/proj'") == "--i=/scratch/mirror/a --o '/scratch/mirror'"
    assert m("a:/apps/x/bin,/mnt/data/proj/b") == "a:/opt/x/bin,/scratch/mirror/b"
    assert m("/mnt/data/projX/a") == "/mnt/data/projX/a", "another folder with that prefix"
    assert m("/backup/mnt/data/proj/a") == "/backup/mnt/data/proj/a", "inside another path"
