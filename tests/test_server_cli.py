# `tinysd serve`'s command line: bad arguments and a missing server extra are one line on stderr and exit 2, before any model loads.
# No fastapi needed: these run (and must pass) without the server extra too.
import importlib.util
import pytest
from tinysd.cli import main

def _one_line_error(capsys, part):
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("tinysd: error:") and part in err, err

def test_bad_arguments(tmp_path, capsys):
  model = tmp_path / "m.safetensors"
  model.write_bytes(b"")   # never read: every case fails first
  for args, part in ((["--api-auth", "nocolon"], "--api-auth"), (["--api-auth", "a:b,:c"], "--api-auth"), (["--workers", "0"], "--workers"),
                     (["--port", "70000"], "--port"), (["--attention-chunk", "-1"], "--attention-chunk")):
    assert main(["serve", "--model", str(model), *args]) == 2
    _one_line_error(capsys, part)

def test_missing_model(tmp_path, capsys):
  assert main(["serve", "--model", str(tmp_path / "missing.safetensors")]) == 2
  _one_line_error(capsys, "does not exist")

def test_missing_server_extra(tmp_path, capsys, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
  (tmp_path / "m.safetensors").write_bytes(b"")
  assert main(["serve", "--model", str(tmp_path / "m.safetensors")]) == 2
  _one_line_error(capsys, "pip install 'tinysd[server]'")

def test_bad_checkpoint_fails_before_binding(tmp_path, capsys):
  pytest.importorskip("fastapi"); pytest.importorskip("uvicorn")
  (tmp_path / "bad.safetensors").write_bytes(b"junk")
  for workers in ("1", "2"):   # loaded in the server's engine thread, or in each worker process
    assert main(["serve", "--model", str(tmp_path / "bad.safetensors"), "--workers", workers, "--port", "1"]) == 2
    _one_line_error(capsys, "not a checkpoint")
