"""Test sessions running at once (CI, a developer, helpers) each get a private host of
their own: one session's teardown once took down the host another was using (5 failures and
3 errors in a clean-clone run while a second session ran)."""
import subprocess
import sys

from scipion_cloudexec.testbed.private import lease_name

LEASE_IN_CHILD = ("import sys; from scipion_cloudexec.testbed.private import lease_name; "
                  "print(lease_name(sys.argv[1], 'p')[0])")


def lease_elsewhere(root) -> str:
    """The name a session in another process gets now (its lease ends with that process)."""
    return subprocess.run([sys.executable, "-c", LEASE_IN_CHILD, str(root)], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_a_held_name_goes_to_no_other_session_and_is_free_again_once_released(tmp_path):
    name, release = lease_name(str(tmp_path), "p")
    assert name == "p1"
    assert lease_name(str(tmp_path), "p")[0] == "p1", "the holder itself gets it again"
    other = subprocess.Popen([sys.executable, "-c", LEASE_IN_CHILD + "; import time; "
                              "time.sleep(30)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "p2"
        assert lease_elsewhere(tmp_path) == "p3", "p1 and p2 are held by live sessions"
    finally:
        other.kill()
        other.wait()
    assert lease_elsewhere(tmp_path) == "p2", "the lease of a session that died is taken over"
    release()
    assert lease_elsewhere(tmp_path) == "p1"
