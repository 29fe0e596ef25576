# The bad-input table, through the real `tinysd` command: one line on stderr, exit status 2, no traceback, no output file.
import json, subprocess, sys
import numpy as np, pytest
from PIL import Image
from fixtures import make_tiny_pipeline_folder, make_tiny_single_file

def tinysd(*args, cwd=None):
  r = subprocess.run([sys.executable, "-m", "tinysd.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)
  return r.returncode, r.stdout, r.stderr

@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return make_tiny_single_file(tmp_path_factory.mktemp("m") / "tiny.safetensors", family="sd1")

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_tiny_pipeline_folder(tmp_path_factory.mktemp("f"), family="sd1")

@pytest.fixture(scope="module")
def image(tmp_path_factory):
  p = tmp_path_factory.mktemp("img") / "init.png"
  Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(p)
  return p

def bad(tmp_path, *args, match):
  out = tmp_path / "out.png"
  code, stdout, stderr = tinysd(*args, "--output", out)
  assert code == 2, (code, stderr)
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in stderr, stderr
  assert match in lines[0], lines[0]
  assert not out.exists() and not list(tmp_path.glob(".out.png.*"))

def write_truncated(src, dst, frac=0.5):
  data = open(src, "rb").read()
  open(dst, "wb").write(data[:int(len(data) * frac)])
  return dst

T2I = ("txt2img", "--prompt", "a cat", "--steps", "1", "--width", "64", "--height", "64")

def test_missing_model(tmp_path): bad(tmp_path, *T2I, "--model", tmp_path / "nope.safetensors", match="does not exist")
def test_truncated_safetensors(tmp_path, model): bad(tmp_path, *T2I, "--model", write_truncated(model, tmp_path / "t.safetensors"), match="truncated")
def test_truncated_header(tmp_path, model): bad(tmp_path, *T2I, "--model", write_truncated(model, tmp_path / "t.safetensors", 1e-5), match="safetensors")

def test_not_a_checkpoint(tmp_path, image):
  p = tmp_path / "x.safetensors"; p.write_bytes(b"hello, I am not a checkpoint" * 10)
  bad(tmp_path, *T2I, "--model", p, match="safetensors")
  bad(tmp_path, *T2I, "--model", image, match="checkpoint")

def test_unsupported_family(tmp_path):
  from safetensors.numpy import save_file
  p = tmp_path / "llm.safetensors"
  save_file({"model.layers.0.self_attn.q_proj.weight": np.zeros((4, 4), np.float32)}, str(p))
  bad(tmp_path, *T2I, "--model", p, match="unknown")

def test_ckpt_pickle_refused_or_checked(tmp_path):
  import pickle
  p = tmp_path / "evil.ckpt"
  class Evil:
    def __reduce__(self): return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')",))
  p.write_bytes(pickle.dumps(Evil()))
  bad(tmp_path, *T2I, "--model", p, match="ckpt")
  assert not (tmp_path / "pwned").exists()

@pytest.mark.parametrize("args,match", [
  (("--width", "60"), "multiple of 8"), (("--height", "100"), "multiple of 8"), (("--width", "65536"), "too large"),
  (("--steps", "0"), "steps"), (("--guidance", "-1"), "guidance"), (("--sampler", "heun9000"), "unknown sampler"),
  (("--batch", "0"), "batch"), (("--dtype", "float8"), "dtype"), (("--compute-dtype", "float8"), "compute-dtype"),
  (("--vae-tile", "-1"), "vae-tile"), (("--quant", "int3"), "quant"), (("--compress-shortcuts", "int4"), "compress-shortcuts")])
def test_bad_generation_args(tmp_path, model, args, match):
  bad(tmp_path, "txt2img", "--model", model, "--prompt", "a cat", "--steps", "1", "--width", "64", "--height", "64", *args, match=match)

def test_img2img_bad_inputs(tmp_path, model, image):
  I2I = ("img2img", "--model", model, "--prompt", "a cat", "--steps", "2")
  bad(tmp_path, *I2I, "--image", tmp_path / "missing.png", match="does not exist")
  txt = tmp_path / "notimage.png"; txt.write_text("not an image")
  bad(tmp_path, *I2I, "--image", txt, match="not a readable image")
  bad(tmp_path, *I2I, "--image", image, "--strength", "1.5", match="strength")
  bad(tmp_path, *I2I, "--image", image, "--strength", "-0.1", match="strength")

def test_inpaint_bad_mask(tmp_path, model, image):
  m = tmp_path / "mask.png"; Image.new("L", (64, 32), 255).save(m)
  bad(tmp_path, "inpaint", "--model", model, "--prompt", "a cat", "--steps", "1", "--image", image, "--mask", m, match="aspect")
  bad(tmp_path, "inpaint", "--model", model, "--prompt", "a cat", "--steps", "1", "--image", image, match="no mask")

def test_long_prompt_warns_and_writes_png(tmp_path, model):
  out = tmp_path / "ok.png"
  code, stdout, stderr = tinysd("txt2img", "--model", model, "--prompt", "a red cat " * 40, "--steps", "1", "--width", "64", "--height", "64",
                                "--seed", "5", "--sampler", "ddim", "--output", out)
  assert code == 0, stderr
  assert "tokens were dropped" in stderr and "45 tokens" in stderr  # 120 words + BOS/EOS = 122 ids; 77 kept
  im = Image.open(out)
  params = im.text["parameters"]
  assert params.startswith("a red cat") and "Steps: 1, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64" in params

def test_info_and_convert_roundtrip(tmp_path, folder):
  code, stdout, stderr = tinysd("info", folder)
  assert code == 0, stderr and "sd1" in stdout
  dst = tmp_path / "one.safetensors"
  code, stdout, stderr = tinysd("convert", folder, dst)
  assert code == 0 and dst.exists(), stderr
  code, stdout2, stderr = tinysd("info", dst)
  assert code == 0 and "sd1" in stdout2, stderr

def test_help_for_each_subcommand():
  for sub in ("txt2img", "img2img", "inpaint", "convert", "info", "bench"):
    code, stdout, _ = tinysd(sub, "--help")
    assert code == 0 and "usage" in stdout

def test_every_memory_switch_at_once(tmp_path, model):
  # fp16 weights, int8 weights quantised at load, shortcuts int8, lowmem residency, tiled VAE (tile 4 latents: the 64 px tiny model tiles)
  out = tmp_path / "lean.png"
  code, stdout, stderr = tinysd("txt2img", "--model", model, "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--seed", "1",
                                "--dtype", "float16", "--quant", "int8", "--compress-shortcuts", "int8", "--lowmem", "--vae-tile", "8",
                                "--output", out)
  assert code == 0, stderr
  im = np.asarray(Image.open(out))
  assert im.shape == (64, 64, 3) and im.std() > 0
