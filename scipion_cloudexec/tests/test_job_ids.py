"""The running jobs' ids in the protocol's database (what Scipion's Stop cancels), written in
group commits: every change is committed when its call returns, in fewer commits."""
import threading

from pyworkflow.mapper import SqliteMapper
from pyworkflow.plugin import Domain

from scipion_cloudexec.executors.job_ids import JobIdList
from scipion_cloudexec.protocols import ProtCloudShellSteps


def _stored_ids(db):
    prot = SqliteMapper(db, Domain.getMapperDict()).selectByClass("ProtCloudShellSteps")[0]
    return sorted(prot.getJobIds())


def test_every_change_is_committed_when_its_call_returns_in_fewer_commits(tmp_path):
    db = str(tmp_path / "run.db")
    mapper = SqliteMapper(db, Domain.getMapperDict())
    prot = ProtCloudShellSteps(mapper=mapper)
    prot._store()
    commits, seen = [], {}
    commit = mapper.commit

    def counting_commit():
        commits.append(1)
        commit()
    mapper.commit = counting_commit
    ids = JobIdList(lambda: prot)
    refs = ["c:job-%d" % i for i in range(24)]
    go = threading.Barrier(len(refs))

    def add(ref):
        go.wait()
        ids.change(ref, add=True)
        seen[ref] = ref in _stored_ids(db)  # a fresh reader sees it once the call returned

    threads = [threading.Thread(target=add, args=(r,)) for r in refs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(seen[r] for r in refs) and _stored_ids(db) == sorted(refs)
    assert len(commits) < len(refs), "one commit per change: %d" % len(commits)
    for r in refs[:10]:
        ids.change(r, add=False)
    ids.change("c:not-listed", add=False)  # logged, never raised
    assert _stored_ids(db) == sorted(refs[10:])
