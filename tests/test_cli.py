# The bad-input table, through the real `tinysd` command: one line on stderr, exit status 2, no traceback, no output file.
import json, os, shutil, stat, struct, subprocess, sys, zlib
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
  # the expected text must come from the message, not from the paths it quotes (tmp_path holds the test's name, files their suffixes)
  text = lines[0]
  for a in sorted({str(a) for a in args if isinstance(a, os.PathLike)} | {str(out), str(tmp_path)}, key=len, reverse=True): text = text.replace(a, "<path>")
  assert match in text, lines[0]
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
  bad(tmp_path, *T2I, "--model", p, match="PyTorch pickle; not supported, convert it to .safetensors")   # was "ckpt": only the path said it
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

def test_long_prompt_is_not_truncated_and_writes_png(tmp_path, model):
  out = tmp_path / "ok.png"
  code, stdout, stderr = tinysd("txt2img", "--model", model, "--prompt", "a red cat " * 40, "--steps", "1", "--width", "64", "--height", "64",
                                "--seed", "5", "--sampler", "ddim", "--output", out)
  assert code == 0, stderr
  assert "dropped" not in stderr and "warning" not in stderr   # 120 tokens: two chunks of 75 (tinysd/prompt.py), nothing truncated
  im = Image.open(out)
  params = im.text["parameters"]
  assert params.startswith("a red cat") and "Steps: 1, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64" in params

def test_info_and_convert_roundtrip(tmp_path, folder):
  code, stdout, stderr = tinysd("info", folder)
  assert code == 0 and "sd1" in stdout, stderr
  dst = tmp_path / "one.safetensors"
  code, stdout, stderr = tinysd("convert", folder, dst)
  assert code == 0 and dst.exists(), stderr
  code, stdout2, stderr = tinysd("info", dst)
  assert code == 0 and "sd1" in stdout2, stderr

def test_help_for_each_subcommand():
  for sub in ("txt2img", "img2img", "inpaint", "convert", "info", "bench", "demo-model"):
    code, stdout, _ = tinysd(sub, "--help")
    assert code == 0 and "usage" in stdout

def _library(model, kind, image=None, mask=None, vae_tile=None, chunk=1024, seed=1):
  # what the CLI runs, called as a library user would (tinysd.load + the pipeline method); the CLI's PNG must hold exactly these pixels
  from tinysd.pipeline import load
  pipe = load(model)
  pipe.attention_chunk = chunk or None
  if vae_tile is not None: pipe.vae_tile = vae_tile
  kw = dict(steps=2, guidance_scale=7.5, seed=seed)
  if kind == "txt2img": return np.asarray(pipe.txt2img("a cat", width=64, height=64, sampler="euler_a", **kw)[0])
  if kind == "img2img": return np.asarray(pipe.img2img("a cat", str(image), strength=0.75, sampler="ddim", **kw)[0])
  return np.asarray(pipe.inpaint("a cat", str(image), str(mask), strength=1.0, sampler="ddim", **kw)[0])

def test_every_memory_switch_at_once(tmp_path, model):
  # fp16 weights, int8 weights quantised at load, shortcuts int8, lowmem residency, tiled VAE (tile 8 latents: the 64 px tiny model tiles).
  # Bound: the library's float model with the same tiles (tiling is checked against diffusers in tests/test_ops_tiling.py) within a tenth
  # of the distance between two seeds' images (measured: 0.9/255 from fp16+int8+shortcuts vs 42/255 between seeds); and not equal to it,
  # so the switches were applied (int8 weights and shortcuts each move pixels: 0.12/255 and 0.74/255 mean).
  out = tmp_path / "lean.png"
  code, stdout, stderr = tinysd("txt2img", "--model", model, "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--seed", "1",
                                "--sampler", "euler_a", "--dtype", "float16", "--quant", "int8", "--compress-shortcuts", "int8", "--lowmem",
                                "--vae-tile", "8", "--output", out)
  assert code == 0, stderr
  im = np.asarray(Image.open(out)).astype(float)
  ref, other = (_library(model, "txt2img", vae_tile=8, seed=s).astype(float) for s in (1, 2))
  assert im.shape == (64, 64, 3) and not np.array_equal(im, ref)
  assert np.abs(im - ref).mean() < 0.1 * np.abs(other - ref).mean(), (np.abs(im - ref).mean(), np.abs(other - ref).mean())

def _mask(tmp_path):
  p = tmp_path / "mask.png"   # white (repaint) left half
  Image.fromarray(np.where(np.arange(64)[None, :, None] < 32, 255, 0).repeat(64, 0).repeat(3, 2).astype(np.uint8)).save(p)
  return p

@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_edit_commands_equal_the_library(tmp_path, model, image, kind):
  # a real img2img / inpaint run through the command, pixel for pixel the library call's result (tests/test_edit.py holds those to diffusers)
  mask, out = _mask(tmp_path), tmp_path / "out.png"
  args = ("--image", image, "--strength", "0.75") if kind == "img2img" else ("--image", image, "--mask", mask)
  code, _, stderr = tinysd(kind, "--model", model, "--prompt", "a cat", "--steps", "2", "--seed", "1", "--sampler", "ddim", *args, "--output", out)
  assert code == 0, stderr
  cli, lib = np.asarray(Image.open(out)), _library(model, kind, image, mask)
  assert cli.shape == (64, 64, 3) and np.array_equal(cli, lib)
  assert np.abs(cli - np.asarray(Image.open(image).convert("RGB")).astype(float)).mean() > 5   # re-imagined, not passed through
  assert not np.array_equal(lib, _library(model, kind, image, mask, seed=2))   # the seed reaches the result: equality is not vacuous

def test_split_attention_in_the_command(tmp_path, model):
  # split attention, the default, at a size where it splits: 32 px = 256 latent tokens at the first level in 128-token tiles (2 x 2). It
  # runs on tinygrad's kernels (TINYSD_KERNELS=generic; the CPU fast path's fused C attention takes its place otherwise): the command,
  # its split attentions counted, against the library on this process's kernels (the fast path's: other kernels, so equal up to rounding;
  # measured: equal; bound max 1/255, mean 0.05/255)
  out = tmp_path / "split.png"
  count = ("import sys, tinysd_ops.attention as a; n = []; s = a.split_attention; a.split_attention = lambda *x, **k: n.append(x[0].shape[-2]) or s(*x, **k); "
           "from tinysd.cli import main; rc = main(sys.argv[1:]); print('splits', n); sys.exit(rc)")
  r = subprocess.run([sys.executable, "-c", count, "txt2img", "--model", model, "--prompt", "a cat", "--steps", "1", "--seed", "1", "--width", "32",
                      "--height", "32", "--sampler", "euler", "--attention-chunk", "128", "--output", out], capture_output=True, text=True,
                     timeout=600, env={**os.environ, "TINYSD_KERNELS": "generic"})
  assert r.returncode == 0, r.stderr
  splits = json.loads(r.stdout.split("splits ")[1].strip().replace("(", "[").replace(")", "]"))
  assert splits and all(n > 128 for n in splits), r.stdout
  from tinysd.pipeline import load
  pipe = load(model)
  lib = np.asarray(pipe.txt2img("a cat", steps=1, seed=1, width=32, height=32, sampler="euler")[0]).astype(float)
  d = np.abs(np.asarray(Image.open(out)) - lib)
  print(f"command (split, generic) vs library: max {d.max()}, mean {d.mean():.4f}")
  assert d.max() <= 1 and d.mean() < 0.05, (d.max(), d.mean())

def test_demo_model(tmp_path):
  # the newcomer path: no network, no weights -- a random-weight model labelled as noise, usable by every command
  out = tmp_path / "demo"
  code, stdout, stderr = tinysd("demo-model", out)
  assert code == 0 and "noise" in stdout, stderr
  assert "noise" in json.loads((out / "model_index.json").read_text())["_tinysd_demo"] and "noise" in (out / "README.md").read_text()
  assert sum(f.stat().st_size for f in out.rglob("*")) < 20e6
  png = tmp_path / "noise.png"
  code, _, stderr = tinysd("txt2img", "--model", out, "--prompt", "hello", "--width", "64", "--height", "64", "--steps", "2", "--seed", "3",
                           "--output", png)
  assert code == 0, stderr
  im = Image.open(png)
  assert im.size == (64, 64) and "Note: demo model, random weights" in im.text["parameters"] and np.asarray(im).std() > 1

# ---- checked before the model is read (issue 12): a model path that does not exist shows the check comes first ----

@pytest.mark.parametrize("args,match", [
  (("--guidance", "inf"), "finite"), (("--guidance", "nan"), "finite"), (("--seed", "4294967296"), "--seed must be in"),
  (("--seed", "-2"), "--seed must be in")])
def test_checked_before_the_model(tmp_path, args, match):
  bad(tmp_path, *T2I, "--model", tmp_path / "never-read.safetensors", *args, match=match)

def test_bad_output_paths(tmp_path):
  fifo = tmp_path / "fifo.png"; os.mkfifo(fifo)
  (tmp_path / "dir.png").mkdir()
  for out, match in [(tmp_path / "no" / "x.png", f"folder '{tmp_path / 'no'}' does not exist"), (tmp_path / "dir.png", "is a folder"),
                     (fifo, "not a regular file"), ("/proc/x.png", "cannot write '/proc/x.png'"), (tmp_path / "x.jpg", ".png path"),
                     (f"{tmp_path / 'd.png'}/", ".png path")]:
    code, _, stderr = tinysd(*T2I, "--model", tmp_path / "never-read.safetensors", "--output", out)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and match in stderr and ".tmp" not in stderr, stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "fifo.png"]   # the writability probe left nothing

def test_invalid_utf8_prompt(tmp_path):
  r = subprocess.run([sys.executable, "-m", "tinysd.cli", *T2I[:2], b"a \xff cat", *T2I[3:], "--model", str(tmp_path / "never-read.safetensors")],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and r.stderr.strip() == r"tinysd: error: --prompt is not valid UTF-8 (undecodable byte b'\xff' at character 2)"

def test_steps_above_training_timesteps(tmp_path, model):
  bad(tmp_path, *T2I, "--model", model, "--steps", "1001", match="steps must be <= 1000, the model's training timesteps")

def test_hub_failure_keeps_its_reason(tmp_path):   # conftest sets HF_HUB_OFFLINE=1
  bad(tmp_path, *T2I, "--model", "someone/no-such-model", match="could not fetch 'someone/no-such-model' from the Hugging Face Hub (")
  code, _, stderr = tinysd(*T2I, "--model", "someone/no-such-model")
  assert "Error: " in stderr and "outgoing traffic has been disabled" in stderr, stderr   # huggingface_hub's own words

def edited_folder(src, dst, edit):
  # a copy of the folder whose files are symlinks to the fixture's, edit(dst) rewriting some of them
  shutil.copytree(src, dst, copy_function=os.symlink)
  edit(dst)
  return dst

def _rewrite(p, change):   # replace the symlink (never write through it into the module's fixture) by the changed JSON
  d = json.loads(p.read_text()); p.unlink(); change(d); p.write_text(json.dumps(d))

def test_known_holes_are_one_line(tmp_path, folder, image):
  h = b'{"a":' + b"[" * 50000 + b"]" * 50000 + b"}"   # deeply nested JSON header (past tinygrad's recursion limit): a RecursionError traceback
  deep = tmp_path / "deep.safetensors"; deep.write_bytes(len(h).to_bytes(8, "little") + h)
  bad(tmp_path, *T2I, "--model", deep, match="corrupted safetensors header (not valid JSON)")
  pad = edited_folder(folder, tmp_path / "pad", lambda d: _rewrite(d / "tokenizer" / "tokenizer_config.json", lambda j: j.update(pad_token="<|nope|>")))
  bad(tmp_path, *T2I, "--model", pad, match="pad token '<|nope|>' is not in the vocabulary")
  typed = edited_folder(folder, tmp_path / "typed", lambda d: _rewrite(d / "unet" / "config.json", lambda j: j.update(block_out_channels="32")))
  bad(tmp_path, *T2I, "--model", typed, match="unet/config.json: block_out_channels must be tuple[int,...], got '32'")
  huge = tmp_path / "huge.png"
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
  huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""))   # 900 MP header
  # (PIL's DecompressionBombError was a traceback)
  bad(tmp_path, "img2img", "--model", folder, "--prompt", "a cat", "--steps", "1", "--image", huge, match="downscale it first")

# ---- outputs safe to share (issue 12): umask modes, atomic, all of a batch or nothing, Ctrl-C leaves nothing ----

def test_outputs_mode_atomic_all_or_nothing(tmp_path):
  from tinysd.cli import save_pngs
  old = os.umask(0o022)
  try:
    ims, paths = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")], [tmp_path / "a.png", tmp_path / "b.png"]
    paths[0].write_bytes(b"old"); os.chmod(paths[0], 0o600)
    save_pngs(ims, paths, ["p0", "p1"])   # overwriting takes the umask's mode, as a new file does (mkstemp made everything 0600)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o644, 0o644] and Image.open(paths[1]).text["parameters"] == "p1"
    os.umask(0o077)
    save_pngs(ims[:1], [tmp_path / "c.png"], [""])
    assert stat.S_IMODE((tmp_path / "c.png").stat().st_mode) == 0o600
    class Fails:
      def __init__(self, e): self.e = e
      def save(self, *a, **k): raise self.e
    paths[0].write_bytes(b"keep")
    with pytest.raises(OSError, match="disk full"): save_pngs([ims[0], Fails(OSError("disk full"))], [tmp_path / "new.png", paths[0]], ["", ""])
    with pytest.raises(KeyboardInterrupt): save_pngs([Fails(KeyboardInterrupt())], [paths[0]], [""])
    assert not (tmp_path / "new.png").exists() and paths[0].read_bytes() == b"keep" and not list(tmp_path.glob(".*"))
  finally: os.umask(old)

def test_converted_checkpoints_follow_umask(tmp_path, model):
  from tinysd.checkpoint import convert
  old = os.umask(0o022)
  try:
    convert(model, tmp_path / "conv")   # a diffusers folder: was 0700 (mkdtemp) with 0600 files
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "conv", *(tmp_path / "conv").rglob("*")]}
    assert modes["conv"] == modes["conv/unet"] == 0o755 and modes["conv/unet/diffusion_pytorch_model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o755, 0o644} and not list(tmp_path.glob(".*"))
  finally: os.umask(old)
