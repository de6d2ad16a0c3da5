"""One family of infrastructure failures (issue 11): the executor and the CLI tell a cluster's
failure from the program's by ``isinstance(e, InfraError)``, and the session wraps what the
lower layers let through raw."""
import pytest

from scipion_cloudexec.cluster import errors as e
from scipion_cloudexec.cluster.bundle import BundleError
from scipion_cloudexec.cluster.errors import InfraError
from scipion_cloudexec.cluster.session import ClusterSession, executor_client_name, mirror_of
from scipion_cloudexec.cluster.ssh import (AuthRefused, HostKeyChanged, HostUnreachable, SSHError,
                                           UnknownHostKey)
from scipion_cloudexec.remote.jobs import JobState

RESULT = e.JobResult(job_id="j", cluster="c", state=JobState.LOST, exit_code=None)


@pytest.mark.parametrize("error, down, lasting", [
    (SSHError("x"), True, False),
    (HostUnreachable("x"), True, True),
    (UnknownHostKey("x"), True, True),
    (HostKeyChanged("x"), True, True),
    (AuthRefused("x"), True, True),
    (e.AgentStartError("x"), True, True),
    (e.AgentNotAnswering("x"), True, False),
    (BundleError("x"), True, True),
    (e.VersionMismatch("x"), True, True),
    (e.AgentLost("c", "h", "x"), True, False),
    (e.LinkLost("x"), True, False),
    (e.JobLost(RESULT), False, False),
    (e.StagingError("x"), False, False),
    (e.NoSpace("c", 10, 1), False, False),
])
def test_every_failure_of_a_cluster_is_an_infra_error(error, down, lasting):
    assert isinstance(error, InfraError)
    assert (e.cluster_down(error), e.cannot_use(error)) == (down, lasting)


@pytest.mark.parametrize("error", [
    e.JobFailed(RESULT), e.JobCancelled(RESULT), e.RequestRefused("spec", "x"),
    e.InputMissing("x"), e.DesktopFull("c", "/d", 1), EOFError(), ValueError("x"),
])
def test_the_programs_and_the_desktops_own_failures_are_not(error):
    assert not e.is_infra(error)


def test_a_closed_session_refuses_with_link_lost_not_a_raw_socket_error(make_cluster, tmp_path):
    """A sibling that found the cluster lost closes the session: a job still using it fails
    as an infrastructure failure (retried), never as the program's."""
    (tmp_path / "a.txt").write_text("a")
    session = ClusterSession(make_cluster("local"))
    session.start()
    session.close()
    with pytest.raises(e.LinkLost, match="closed"):
        session.stage_in(str(tmp_path), ["a.txt"], "proj")
    with pytest.raises(InfraError):
        session.jobs()


def test_a_link_dropped_under_a_session_surfaces_as_infra_error(make_cluster):
    session = ClusterSession(make_cluster("local"))
    with session:
        session.ssh.transport.sock.close()  # the link goes, paramiko raises what it raises
        with pytest.raises(InfraError):
            session.stage_in("/", ["/etc/hostname"], "proj")


def test_executor_client_names_carry_their_mirror():
    name = executor_client_name("proj-abc123", 7)
    assert name == "scipion:proj-abc123:7"
    assert mirror_of(name) == "proj-abc123"
    assert mirror_of("someone@desk/12") is None
