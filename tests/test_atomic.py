"""Atomic writes under a real SIGKILL: the old file survives, and the dead writer's temp file is cleaned up."""

from __future__ import annotations

import signal
import subprocess
import sys

from oodlab.atomic import remove_stale_partials, write_text

WRITER = """
import sys, time
from oodlab.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "w") as f:
        f.write("half of the new content")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
"""


def test_sigkilled_writer_leaves_the_old_file_and_its_temp_file_is_removed_next_time(tmp_path):
    target = write_text(tmp_path / "state.json", "old")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    partial = tmp_path / f".state.json.partial-{writer.pid}"
    assert partial.read_text() == "half of the new content" and target.read_text() == "old"

    live = tmp_path / ".state.json.partial-1"  # pid 1 exists: a live writer's file is left alone
    live.write_text("someone else's")
    write_text(target, "new")
    assert target.read_text() == "new" and not partial.exists() and live.exists()
    assert remove_stale_partials(target) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "state.json"]
