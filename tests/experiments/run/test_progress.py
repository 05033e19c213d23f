"""experiments/run/progress.py: the stage bar counts each stage once, in order."""

import io

from experiments.run import progress


def test_stages_show_each_name_as_it_starts_and_count_it_when_it_ends(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr("sys.stderr", stream)
  bar = progress.stages(("fit", "measure"), desc="study")
  assert next(bar) == "fit"
  assert "0/2" in stream.getvalue() and "fit" in stream.getvalue()
  assert next(bar) == "measure"
  assert "1/2" in stream.getvalue() and "measure" in stream.getvalue()
  assert next(bar, None) is None  # the last stage ended: the bar closes
  assert stream.getvalue().endswith("\r")  # and leaves the terminal clear
