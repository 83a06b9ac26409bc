"""A Ctrl-C that Python swallows (raised inside a finalizer, where it is printed and dropped) still stops
the search at its next step: the bundled model, a real study, in this process."""

import gc
import os
import signal

from search import driver
from search.cli import main
from tests.search_helpers import completed_in, write_config


class PressesCtrlCWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside the finalizer


def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_the_search(tmp_path, monkeypatch, capsys):
    settle = driver.settle
    pressed = []

    def settle_then_press(ctx, outcome):
        if not pressed:
            pressed.append(PressesCtrlCWhenCollected())
            pressed[0] = None  # collected now: the KeyboardInterrupt is raised in __del__, and ignored
            gc.collect()
        return settle(ctx, outcome)

    monkeypatch.setattr(driver, "settle", settle_then_press)
    config = write_config(tmp_path)
    assert main(["search", str(config), "--runs-dir", str(tmp_path / "runs")]) == 130
    [run_dir] = (tmp_path / "runs").iterdir()
    assert completed_in(run_dir / "study.db") <= 2  # the batch in hand, not the 20 of the whole search
    assert f"`ropesearch resume {run_dir}` continues it" in capsys.readouterr().err
