# The bad-input table of docs/bad_input.md: every class of bad input run through the real `tinysd` command (one process each), with its
# exit status, stderr line count and wall time from process start to exit. Inputs are made here: a tiny random-weight SD1 model (the
# bench's "tiny" config: nothing is downloaded) as a single file and a diffusers folder, damaged copies of them, and broken images.
#   python examples/bad_input_table.py [--keep DIR]     prints the markdown table; exit 1 if a row is not "one line, exit 2, < 2 s"
import argparse, json, os, pathlib, shutil, struct, subprocess, sys, tempfile, time, zlib
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # this checkout's tinysd, installed or not

def png_header(w, h) -> bytes:   # a PNG claiming w x h pixels (PIL learns the size without decoding anything)
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")

def make_inputs(d:pathlib.Path):
  import numpy as np
  from PIL import Image
  from tinysd.bench import TINY
  from tinysd.checkpoint import write_single_file, write_diffusers_folder
  from tinysd.pipeline import random_pipeline, components
  from tinygrad.nn.state import get_state_dict
  pipe = random_pipeline(TINY)
  sds = {n: get_state_dict(m) for n, m in components(pipe).items()}
  write_single_file(sds, TINY, d / "tiny.safetensors")
  write_diffusers_folder(sds, TINY, d / "tiny")
  def edited(name, rel, change):   # a copy of the folder, weights symlinked, one JSON file changed
    shutil.copytree(d / "tiny", d / name, copy_function=os.symlink)
    p = d / name / rel
    j = json.loads(p.read_text()); p.unlink(); change(j); p.write_text(json.dumps(j))
  edited("pad", "tokenizer/special_tokens_map.json", lambda j: j.update(pad_token="<|nope|>"))
  edited("typed", "unet/config.json", lambda j: j.update(block_out_channels="32"))
  edited("sched", "scheduler/scheduler_config.json", lambda j: j.update(beta_schedule="cosine"))
  data = (d / "tiny.safetensors").read_bytes()
  (d / "truncated.safetensors").write_bytes(data[:len(data) // 2])
  (d / "text.safetensors").write_text("hello, I am not a checkpoint" * 10)
  h = b'{"a":' + b"[" * 50000 + b"]" * 50000 + b"}"
  (d / "nested.safetensors").write_bytes(len(h).to_bytes(8, "little") + h)
  llm = json.dumps({"model.layers.0.q_proj.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
  (d / "llm.safetensors").write_bytes(len(llm).to_bytes(8, "little") + llm + bytes(16))
  (d / "evil.ckpt").write_bytes(b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04exec\x94\x93\x94.")
  Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(d / "init.png")
  good = (d / "init.png").read_bytes()
  (d / "cut.png").write_bytes(good[:len(good) // 2])
  (d / "notes.png").write_text("not an image")
  (d / "bomb.png").write_bytes(png_header(30000, 30000))
  (d / "huge.png").write_bytes(png_header(5000, 5000))
  Image.new("RGB", (4, 64)).save(d / "tiny-img.png")
  Image.fromarray(np.full((64, 64), np.nan, np.float32), "F").save(d / "nan.tif")
  Image.new("L", (64, 32), 255).save(d / "wide-mask.png")
  Image.new("L", (64, 64), 0).save(d / "black-mask.png")
  (d / "out-dir.png").mkdir()
  os.mkfifo(d / "fifo.png")

T = ["txt2img", "--prompt", "a cat", "--steps", "1", "--width", "64", "--height", "64"]
I = ["img2img", "--prompt", "a cat", "--steps", "1"]
P = ["inpaint", "--prompt", "a cat", "--steps", "1"]
M, F = ["--model", "tiny.safetensors"], ["--model", "tiny"]
CASES = [   # (bad input, tinysd arguments, extra environment)
  ("model path missing", T + ["--model", "nope.safetensors"], {}),
  ("truncated .safetensors", T + ["--model", "truncated.safetensors"], {}),
  ("not a checkpoint (text)", T + ["--model", "text.safetensors"], {}),
  ("an image as the model", T + ["--model", "init.png"], {}),
  ("deeply nested JSON header", T + ["--model", "nested.safetensors"], {}),
  ("unknown family (an LLM file)", T + ["--model", "llm.safetensors"], {}),
  ("legacy pickle calling exec", T + ["--model", "evil.ckpt"], {}),
  ("tokenizer pad token not in vocabulary", T + ["--model", "pad"], {}),
  ("wrongly typed config.json value", T + ["--model", "typed"], {}),
  ("unsupported scheduler config", T + ["--model", "sched"], {}),
  ("Hub download fails (offline)", T + ["--model", "someone/no-such-model"], {"HF_HUB_OFFLINE": "1"}),
  ("width not a multiple of 8", T + M + ["--width", "60"], {}),
  ("width too large", T + M + ["--width", "65536"], {}),
  ("steps 0", T + M + ["--steps", "0"], {}),
  ("steps above training timesteps", T + M + ["--steps", "1001"], {}),
  ("guidance inf", T + M + ["--guidance", "inf"], {}),
  ("guidance nan", T + M + ["--guidance", "nan"], {}),
  ("guidance negative", T + M + ["--guidance", "-1"], {}),
  ("seed out of range", T + M + ["--seed", "4294967296"], {}),
  ("unknown sampler", T + M + ["--sampler", "heun9000"], {}),
  ("batch 0", T + M + ["--batch", "0"], {}),
  ("unknown dtype", T + M + ["--dtype", "float8"], {}),
  ("negative --vae-tile", T + M + ["--vae-tile", "-1"], {}),
  ("invalid UTF-8 in the prompt", T[:1] + ["--prompt", b"a \xff cat"] + T[3:] + M, {}),
  ("output folder missing", T + M + ["--output", "no/such/dir/out.png"], {}),
  ("output is a folder", T + M + ["--output", "out-dir.png"], {}),
  ("output not .png", T + M + ["--output", "out.jpg"], {}),
  ("output is a pipe", T + M + ["--output", "fifo.png"], {}),
  ("output folder not writable", T + M + ["--output", "/proc/out.png"], {}),
  ("image missing", I + M + ["--image", "nope.png"], {}),
  ("image is text", I + M + ["--image", "notes.png"], {}),
  ("truncated PNG", I + M + ["--image", "cut.png"], {}),
  ("decompression bomb (900 MP)", I + M + ["--image", "bomb.png"], {}),
  ("image over 16.8 MP", I + M + ["--image", "huge.png"], {}),
  ("image under 8 px", I + M + ["--image", "tiny-img.png"], {}),
  ("float TIFF with NaN", I + M + ["--image", "nan.tif"], {}),
  ("strength 1.5", I + M + ["--image", "init.png", "--strength", "1.5"], {}),
  ("mask of another aspect", P + M + ["--image", "init.png", "--mask", "wide-mask.png"], {}),
  ("mask missing", P + M + ["--image", "init.png", "--mask", "nope.png"], {}),
  ("no mask given or found", P + M + ["--image", "init.png"], {}),
  ("empty (black) mask", P + M + ["--image", "init.png", "--mask", "black-mask.png"], {}),
]

def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--keep", default=None, help="make the inputs in this folder and keep them")
  a = ap.parse_args()
  d = pathlib.Path(a.keep or tempfile.mkdtemp(prefix="tinysd-bad-input-")); d.mkdir(parents=True, exist_ok=True)
  env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  try:
    make_inputs(d)
    exe = [shutil.which("tinysd")] if shutil.which("tinysd") else [sys.executable, "-m", "tinysd.cli"]
    rows, ok = [], True
    for what, args, extra in CASES:
      opts = dict(zip(args[1::2], args[2::2]))   # a case's own --width etc. replace the base command's
      args = [args[0]] + [x for kv in (opts | ({} if "--output" in opts else {"--output": "out.png"})).items() for x in kv]
      t0 = time.perf_counter()
      r = subprocess.run(exe + args, cwd=d, env=env | extra, capture_output=True, timeout=600)
      dt = time.perf_counter() - t0
      lines = r.stderr.decode(errors="replace").strip().splitlines()
      good = r.returncode == 2 and len(lines) == 1 and dt < 2 and not (d / "out.png").exists()
      ok &= good
      shown = " ".join(x.decode("latin-1").encode("unicode_escape").decode() if isinstance(x, bytes) else x for x in args)
      msg = (lines[0] if lines else "").replace(str(d) + "/", "").replace("|", "\\|")
      rows.append(f"| {what} | `tinysd {shown}` | {r.returncode} | {len(lines)} | {dt:.2f} s{'' if good else ' **!**'} | {msg} |")
    print("| bad input | command | exit | stderr lines | time to error | message |\n| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows))
    return 0 if ok else 1
  finally:
    if a.keep is None: shutil.rmtree(d, ignore_errors=True)

if __name__ == "__main__": sys.exit(main())
