"""``cli.common``: progress without a terminal, thread pools, wide tables."""

from __future__ import annotations

import io
import os
import time
from types import SimpleNamespace

import torch

from cli import common


def test_plain_progress_prints_fraction_and_eta_every_interval():
    out = io.StringIO()
    with common.PlainProgress("build x", interval=0.05, stream=out) as p:
        p.update(None, "start")
        time.sleep(0.12)
        p.update(0.25, "attribution")
        time.sleep(0.2)
    lines = out.getvalue().splitlines()
    assert lines[0] == "build x: started" and lines[-1].startswith("build x: done in 0:0")
    assert any(line.startswith("build x [start]: elapsed") for line in lines)
    timed = [line for line in lines if "25.0% (0.250)" in line]
    assert timed and all("[attribution]" in line and ", eta 0:0" in line for line in timed)


def test_progress_without_a_terminal_is_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(common, "progress_seconds", 0.05)
    assert not common.console.is_terminal  # captured stderr

    def work(on_progress):
        for i in range(4):
            on_progress(SimpleNamespace(overall=lambda i=i: i / 4, stage="s"))
            time.sleep(0.06)
        return 7

    assert common.run_with_progress("job", work) == 7
    err = capsys.readouterr().err
    assert "job: started" in err and "job: done in" in err and "% (0." in err and "\x1b[" not in err


def test_threads_default_to_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert common.default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert common.default_threads() == 3
    assert common.apply_threads(1) == 1 and torch.get_num_threads() == 1


def test_tables_keep_whole_names_when_piped(capsys):
    from rich.table import Table

    name = "a-very-long-vector-name-" * 6
    table = Table()
    table.add_column("name", overflow="fold")
    table.add_column("other")
    table.add_row(name, "x" * 90)
    common.out_console().print(table)
    out = capsys.readouterr().out
    assert name in out and "…" not in out
