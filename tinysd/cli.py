# The `tinysd` command: argument parsing, bad input -> one line on stderr + exit 2, atomic PNG writes with A1111 parameters.
from __future__ import annotations
import argparse, json, os, sys, time, warnings
from pathlib import Path
from tinysd.frontend import SAMPLER_LABELS, DEFAULT_MODEL, UsageError, a1111_parameters, resolve_model   # noqa: F401 (re-exported)

SEED_MAX = 2**32 - 1   # A1111's seed range (a uint32; -1 = random, as there); image i of a batch uses seed+i

class _Parser(argparse.ArgumentParser):
  def error(self, message):   # argparse prints usage + error over two lines and a traceback-free exit 2; keep it one line
    print(f"tinysd: error: {message} (see --help)", file=sys.stderr)
    raise SystemExit(2)

def save_pngs(images, paths:list[Path], parameters:list[str]):
  """All PNGs or none: each written to a temp file beside its target, then all renamed into place (tinysd/outputs.py; mode from the umask)."""
  from PIL.PngImagePlugin import PngInfo
  from tinysd.outputs import write_files
  def write(f, i):
    info = PngInfo()
    info.add_text("parameters", parameters[i])
    images[i].save(f, format="PNG", pnginfo=info)
  write_files(paths, write)

def save_png_atomic(image, path:Path, parameters:str): save_pngs([image], [Path(path)], [parameters])

def output_paths(output:str, n:int) -> list[Path]:
  """The batch's PNG paths, each checked writable now (tinysd/outputs.py check_writable), not after an hour of sampling."""
  from tinysd.outputs import check_writable
  p = Path(output)
  if p.suffix.lower() != ".png" or output.endswith(("/", os.sep)): raise UsageError(f"output must be a .png path, got '{output}'")
  return [check_writable(q) for q in ([p] if n == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)])]

def _utf8(option:str, text:str):
  # argv bytes that are not UTF-8 arrive as lone surrogates (PEP 383); they would fail in the tokenizer after the model is loaded
  try: text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise UsageError(f"{option} is not valid UTF-8 (undecodable byte {text[e.start].encode('utf-8', 'surrogateescape')!r} at character {e.start})") from None

def check_args(a) -> tuple[list[Path], int]:
  """Every check that needs neither the model nor the image, before either is read: (output paths, seed)."""
  _utf8("--prompt", a.prompt); _utf8("--negative-prompt", a.negative_prompt)
  if a.seed is not None and not -1 <= a.seed <= SEED_MAX: raise UsageError(f"--seed must be in [0, {SEED_MAX}] or -1 (random), got {a.seed}")
  if a.attention_chunk < 0: raise UsageError(f"--attention-chunk must be >= 0, got {a.attention_chunk}")
  if a.vae_tile is not None and a.vae_tile < 0: raise UsageError(f"--vae-tile must be >= 0, got {a.vae_tile}")
  paths = output_paths(a.output, max(a.batch, 1))
  return paths, a.seed if a.seed is not None and a.seed >= 0 else int.from_bytes(os.urandom(4), "little") >> 1

def check_model(a, width:int, height:int) -> str:
  """Resolve --model (a Hub download, if it is one) and check the arguments against its config and tokenizers, read without any weight."""
  from tinysd.checkpoint import read_config, read_tokenizers
  from tinysd.pipeline import check_generation_args
  path = resolve_model(a.model)
  cfg = read_config(path)
  check_generation_args(width, height, *_sampling(a), a.batch, train_timesteps=cfg.scheduler.num_train_timesteps)
  read_tokenizers(path, cfg)
  return path

def _common(p:argparse.ArgumentParser, image=False, mask=False):
  p.add_argument("--model", default=os.environ.get("TINYSD_MODEL", DEFAULT_MODEL),
                 help="single-file .safetensors, diffusers folder, or Hub repo id (default: $TINYSD_MODEL or %(default)s)")
  p.add_argument("--prompt", required=True)
  p.add_argument("--negative-prompt", default="")
  turbo = "; a Turbo model (trailing timestep spacing in its scheduler config): %s"
  p.add_argument("--steps", type=int, default=None, help="default: 20" + turbo % "1")
  p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; <= 1 runs no CFG (the prompt alone, no negative "
                 "prompt, as diffusers). Default: 7.5" + turbo % "0")
  p.add_argument("--sampler", default=None, help="plms, ddim, euler, euler_a, dpm++2m, dpm++2m_karras. Default: "
                 + ("euler_a" if not image else "ddim") + turbo % "euler_a")
  p.set_defaults(default_sampler="euler_a" if not image else "ddim")
  p.add_argument("--clip-skip", type=int, default=1, help="condition on the text encoder's N-th layer from the end (A1111's CLIP skip: 1 = last, "
                 "2 = penultimate; SDXL uses the penultimate one already)")
  p.add_argument("--seed", type=int, default=None, help="default: random; image i of a batch uses seed+i")
  if not image:
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights in memory")
  p.add_argument("--compute-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                 help="what the models compute in (default: --dtype, except fp16/bf16 weights compute in fp32 on the CPU, where it is faster; "
                      "bfloat16 on a CPU with AVX512-BF16: fp32 activations, GEMMs/convs on bf16-rounded operands, ~1.4x faster)")
  p.add_argument("--output", default="out.png")
  p.add_argument("--lowmem", action="store_true", help="bring each model in from the checkpoint just for its use (less memory, slower)")
  p.add_argument("--attention-chunk", type=int, default=1024, help="split attention into tiles of this many tokens; 0 = plain attention")
  p.add_argument("--compress-shortcuts", default=None, choices=["fp16", "int8"], help="hold the UNet skip tensors compressed (less memory)")
  p.add_argument("--vae-tile", type=int, default=None, help="tiled VAE decode/encode, tile in latent pixels (default: 32 with --lowmem, else off; 0 = off)")
  p.add_argument("--quant", default=None, choices=["int8", "pal8", "pal6", "pal4"],
                 help="quantise UNet and text-encoder weights while loading (or make a quantised file once: tinysd convert --quant)")
  if image:
    p.add_argument("--image", required=True)
    p.add_argument("--strength", type=float, default=0.75)
  if mask: p.add_argument("--mask", default=None, help="white = repaint; default: the image's alpha channel, or pure green pixels")

def cmd_txt2img(a) -> int:
  from tinysd.pipeline import check_generation_args
  check_generation_args(a.width, a.height, *_sampling(a), a.batch)
  paths, seed = check_args(a)
  pipe = _load(a, check_model(a, a.width, a.height))
  a.steps, a.guidance, a.sampler = _sampling(a, pipe)
  t0 = time.perf_counter()
  images = pipe.txt2img(a.prompt, a.negative_prompt, steps=a.steps, guidance_scale=a.guidance, width=a.width, height=a.height, seed=seed,
                        sampler=a.sampler, batch_size=a.batch, progress=True)
  save_pngs(images, paths, [a1111_parameters(a.prompt, a.negative_prompt, a.steps, a.sampler, a.guidance, seed + i, a.width, a.height, a.model,
                                             **_clip_skip(a), **_demo(a.model)) for i in range(len(paths))])
  for p in paths: print(f"wrote {p}")
  print(f"done in {time.perf_counter()-t0:.1f} s", file=sys.stderr)
  return 0

def cmd_img2img(a, inpaint=False) -> int:
  from tinysd.pipeline import check_generation_args, check_strength
  from tinysd.images import load_image, inpaint_mask
  check_strength(a.strength)
  check_generation_args(8, 8, *_sampling(a), a.batch)   # all but the size, which the image sets
  paths, seed = check_args(a)
  init = load_image(a.image)
  h, w = init.shape[:2]
  check_generation_args(w, h, *_sampling(a), a.batch)
  mask = inpaint_mask(a.image, a.mask, (w, h)) if inpaint else None
  pipe = _load(a, check_model(a, w, h))
  a.steps, a.guidance, a.sampler = _sampling(a, pipe)
  kw = dict(negative_prompt=a.negative_prompt, strength=a.strength, steps=a.steps, guidance_scale=a.guidance, seed=seed, sampler=a.sampler,
            batch_size=a.batch, progress=True)
  images = pipe.inpaint(a.prompt, init, mask, **kw) if inpaint else pipe.img2img(a.prompt, init, **kw)
  extra = {"Denoising strength": a.strength} | ({"Mask": "yes"} if inpaint else {}) | _clip_skip(a) | _demo(a.model)
  save_pngs(images, paths, [a1111_parameters(a.prompt, a.negative_prompt, a.steps, a.sampler, a.guidance, seed + i, w, h, a.model, **extra)
                            for i in range(len(paths))])
  for p in paths: print(f"wrote {p}")
  return 0

def _load(a, path:str):
  import tinysd
  if a.clip_skip < 1: raise UsageError(f"--clip-skip must be >= 1, got {a.clip_skip}")
  pipe = tinysd.load(path, dtype=a.dtype, lowmem=a.lowmem, quant=a.quant, compute_dtype=a.compute_dtype)
  pipe.attention_chunk = a.attention_chunk or None
  pipe.compress_shortcuts = a.compress_shortcuts
  pipe.clip_skip = a.clip_skip
  if a.vae_tile is not None: pipe.vae_tile = a.vae_tile or None
  return pipe

def _sampling(a, pipe=None) -> tuple[int, float, str]:
  """--steps, --guidance, --sampler, those not given taken from the model: 1, 0, euler_a for a Turbo model (its scheduler config has
  diffusers' trailing timestep spacing, as SD-Turbo's and SDXL-Turbo's do), else 20, 7.5 and euler_a (ddim for img2img / inpaint).
  Without a pipeline yet: placeholders that pass the checks, so the given values are checked before the model is loaded."""
  turbo = pipe is None or pipe.config.scheduler.timestep_spacing == "trailing"
  got = (a.steps, a.guidance, a.sampler)
  out = tuple(d if v is None else v for v, d in zip(got, (1, 0.0, "euler_a") if turbo else (20, 7.5, a.default_sampler)))
  if pipe is not None and turbo and None in got:
    print(f"tinysd: Turbo model (trailing timestep spacing): --steps {out[0]} --guidance {out[1]:g} --sampler {out[2]}", file=sys.stderr)
  return out

def _clip_skip(a) -> dict: return {"Clip skip": a.clip_skip} if a.clip_skip > 1 else {}   # A1111 writes it only when > 1

DEMO_NOTE = "random weights (tinysd demo-model): every image it makes is noise"

def _demo(model:str) -> dict:
  # a demo model's PNGs say so in their parameters, so noise is never mistaken for a broken install
  try: return {"Note": f"demo model, {DEMO_NOTE}"} if "_tinysd_demo" in json.loads((Path(model) / "model_index.json").read_text()) else {}
  except (OSError, ValueError, TypeError): return {}

def cmd_demo_model(a) -> int:
  """A diffusers folder holding configs.DEMO with random weights, labelled as noise in model_index.json, a README and its PNGs."""
  from tinysd.configs import DEMO
  from tinysd.checkpoint import write_diffusers_folder, CheckpointError
  from tinysd.pipeline import random_pipeline, components
  from tinygrad.nn.state import get_state_dict
  out = Path(a.out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())): raise CheckpointError(f"{out}: already exists and is not an empty folder")
  if not out.parent.is_dir(): raise UsageError(f"{out.parent}: no such folder")
  pipe = random_pipeline(DEMO, seed=a.seed)
  write_diffusers_folder({n: get_state_dict(m) for n, m in components(pipe).items()}, DEMO, out, dtype="float16",
                         index={"_tinysd_demo": DEMO_NOTE}, readme=f"# tinysd demo model\n\nSD1-shaped, {DEMO_NOTE}. Made by `tinysd "
                         f"demo-model` to try the command line without a download, e.g.\n\n    tinysd txt2img --model {out} --prompt hello "
                         "--width 128 --height 128 --steps 4 --output noise.png\n")
  print(f"wrote {out}: a demo model with random weights (its images are noise); try: tinysd txt2img --model {out} --prompt hello --width 128 "
        "--height 128 --steps 4 --output noise.png")
  return 0

def cmd_info(a) -> int:
  from tinysd.checkpoint import read_checkpoint
  ck = read_checkpoint(a.model)
  print(ck.describe())
  return 0

def cmd_convert(a) -> int:
  from tinysd.checkpoint import convert
  if a.quant:
    from tinysd.pipeline import convert_quantized
    for name, r in convert_quantized(a.src, a.dst, a.quant, dtype=a.dtype or "float16").items():
      print(f"{name}: {r['count']} layers {a.quant}, {r['bytes_before']/2**20:.0f} MiB -> {r['bytes_after_disk']/2**20:.0f} MiB")
  else: convert(a.src, a.dst, dtype=a.dtype)
  print(f"wrote {a.dst}")
  return 0

def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="tinysd", description="Stable Diffusion on tinygrad")
  sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
  s = sub.add_parser("txt2img", help="generate images from a prompt"); _common(s); s.set_defaults(func=cmd_txt2img)
  s = sub.add_parser("img2img", help="re-imagine an init image"); _common(s, image=True); s.set_defaults(func=cmd_img2img)
  s = sub.add_parser("inpaint", help="repaint the masked part of an image"); _common(s, image=True, mask=True)
  s.set_defaults(func=lambda a: cmd_img2img(a, inpaint=True), strength=1.0)
  s = sub.add_parser("info", help="family, dtype, parameter counts and layout of a checkpoint")
  s.add_argument("model"); s.set_defaults(func=cmd_info)
  s = sub.add_parser("convert", help="convert between a diffusers folder and a single-file .safetensors (CompVis layout), or quantise")
  s.add_argument("src"); s.add_argument("dst"); s.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
  s.add_argument("--quant", default=None, choices=["int8", "pal8", "pal6", "pal4"],
                 help="write a tinysd quantised .safetensors (UNet + text encoders quantised, the rest in --dtype, default float16)")
  s.set_defaults(func=cmd_convert)
  s = sub.add_parser("demo-model", help="write a tiny random-weight model (its images are noise) to try the command line without a download")
  s.add_argument("out", help="a new (or empty) folder"); s.add_argument("--seed", type=int, default=0); s.set_defaults(func=cmd_demo_model)
  sub.add_parser("bench", help="benchmark on random weights at real sizes (tinysd bench --help)", add_help=False)   # dispatched in main()
  from tinysd.server import serve   # its arguments only: fastapi/uvicorn (the server extra) are imported when it runs
  s = sub.add_parser("serve", help="HTTP server: AUTOMATIC1111's API (/sdapi/v1/...) and a web page at / (pip install 'tinysd[server]')")
  serve.add_arguments(s); s.set_defaults(func=serve.main)
  return p

def main(argv:list[str]|None=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["bench"]:   # its own parser (tinysd/bench.py), --help included
    from tinysd.bench import main as bench_main
    return bench_main(argv[1:])
  args = build_parser().parse_args(argv)
  _one_line_warnings()
  try:
    return args.func(args)
  except KeyboardInterrupt:
    print("tinysd: interrupted", file=sys.stderr)
    return 130
  except (ValueError, OSError) as e:   # our errors (InputError, CheckpointError, UsageError) are ValueErrors; OSError covers bad paths/images
    if os.environ.get("TINYSD_DEBUG"): raise
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"tinysd: error: {msg}", file=sys.stderr)
    return 2

def _one_line_warnings():
  # tinysd's own warnings (e.g. "using the first frame") in the CLI's one-line style instead of Python's file:line two-liner
  from tinysd.images import ImageWarning
  show = warnings.showwarning
  def showwarning(message, category, *rest, **kw):
    if issubclass(category, ImageWarning): print(f"tinysd: warning: {message}", file=sys.stderr)
    else: show(message, category, *rest, **kw)
  warnings.showwarning = showwarning

if __name__ == "__main__": sys.exit(main())
