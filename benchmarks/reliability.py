"""Produce every fault of docs/RELIABILITY.md for real and rewrite its measured table.

    .venv/bin/python benchmarks/reliability.py            # all rows (about 20 minutes)
    .venv/bin/python benchmarks/reliability.py -k gather  # some rows; the others are kept

Runs the fault tests with ``CLOUDEXEC_RELIABILITY_OUT`` set: each records what it measured
(``reliability`` fixture in tests/conftest.py) once its assertions held (a failing test records
nothing, and its row says so). The rows between the ``<!-- measured -->`` markers of
docs/RELIABILITY.md are rewritten; a row whose test was not run this time keeps its old text.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "RELIABILITY.md")
T = "scipion_cloudexec/tests/"

#: the fault tests, in the table's order; each records its row(s)
TESTS = [
    T + "test_staging.py::test_link_down_mid_file_then_up_resumes",
    T + "test_reliability.py",
    T + "test_agent.py::test_killed_agent_is_reported_within_the_heartbeat_bound_and_jobs_survive",
    T + "test_executor.py::test_killed_protocol_continues_without_running_any_job_twice",
    T + "test_scheduler_faults.py::test_slurmctld_stall_loses_no_job_and_heartbeats_keep_flowing",
    T + "test_scheduler_faults.py::test_slurmctld_down_30s_fails_every_query_yet_no_job_is_lost",
    T + "test_staging.py::test_full_disk_is_refused_before_sending",
    T + "test_sync.py::test_desktop_disk_full_during_a_gather_loses_nothing",
    T + "test_staging.py::test_corrupted_cache_entry_is_detected_and_repaired",
    T + "test_wire_faults.py",
    T + "test_ssh.py::test_unknown_host_key_is_refused_with_fingerprint_and_line",
    T + "test_ssh.py::test_changed_host_key_is_refused",
    T + "test_cache_concurrency.py::test_same_content_uploaded_by_four_at_once",
    T + "test_trustworthy.py::test_mirror_names_tell_desktops_apart",
    T + "test_trustworthy.py::test_a_job_that_ended_in_a_mirror_emptied_since_runs_again",
    T + "test_agent_faults.py",
]

HEADER = ("| fault | when | what the user sees | time to recover (measured) | data lost | "
          "steps run twice | test |\n|---|---|---|---|---|---|---|\n")


def run(selection: List[str], keyword: str) -> List[Dict]:
    out = tempfile.NamedTemporaryFile(prefix="reliability-", suffix=".jsonl", delete=False).name
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", *selection]
    if keyword:
        cmd += ["-k", keyword]
    env = dict(os.environ, CLOUDEXEC_RELIABILITY_OUT=out)
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env)
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    os.unlink(out)
    return rows


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(row: Dict) -> str:
    recover = row.get("recover_s")
    recover = ("%s s" % recover) if isinstance(recover, (int, float)) else (recover or "-")
    extra = [("in all", row.get("total_s"), " s"), ("worst heartbeat gap", row.get("worst_gap_s"),
                                                     " s"),
             ("worst ping", row.get("worst_ping_ms"), " ms")]
    notes = ", ".join("%s %s%s" % (k, v, u) for k, v, u in extra if v is not None)
    if notes:
        recover += " (%s)" % notes
    test = row["test"].replace(T, "")
    return "| %s |\n" % " | ".join(cell(x) for x in (
        row["fault"], row.get("when", "-"), row.get("seen", "-"), recover,
        row.get("lost", 0), row.get("twice", 0), "`%s`" % test))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-k", default="", help="pytest -k expression: run some rows only")
    args = p.parse_args()
    t0 = time.time()
    rows = run(TESTS, args.k)
    with open(DOC) as f:
        doc = f.read()
    start, end = "<!-- measured -->\n", "<!-- /measured -->"
    head, rest = doc.split(start, 1)
    table, tail = rest.split(end, 1)
    old = {}
    for line in table.splitlines():
        m = re.search(r"`([^`]+)` \|$", line)
        if m:
            old.setdefault(m.group(1), []).append(line + "\n")
        elif line.startswith("| ") and not line.startswith("| fault |"):
            old[line] = [line + "\n"]  # a row this script does not make (the soak's): kept
    new: Dict[str, List[str]] = {}
    for row in rows:
        new.setdefault(row["test"].replace(T, ""), []).append(render(row))
    merged = dict(old)
    merged.update(new)
    order = [k for k in merged]
    body = "".join("".join(merged[k]) for k in order)
    stamp = ("Measured %s on %s (%d cores, %s), command `.venv/bin/python "
             "benchmarks/reliability.py%s`; %d row(s) new this run, in %.0f s.\n\n"
             % (time.strftime("%Y-%m-%d"), platform.node() and "this project's machine kind",
                os.cpu_count() or 0, platform.platform(terse=True),
                " -k %s" % args.k if args.k else "", len(rows), time.time() - t0))
    with open(DOC, "w") as f:
        f.write(head + start + stamp + HEADER + body + end + tail)
    print("%d row(s) written to %s" % (len(rows), DOC))
    return 0


if __name__ == "__main__":
    sys.exit(main())
