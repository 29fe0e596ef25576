# The `tinysd` command: argument parsing, bad input -> one line on stderr + exit 2, atomic PNG writes with A1111 parameters.
from __future__ import annotations
import argparse, os, sys, tempfile, time
from pathlib import Path

SAMPLER_LABELS = {"plms": "PLMS", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras"}
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

class UsageError(ValueError): pass

class _Parser(argparse.ArgumentParser):
  def error(self, message):   # argparse prints usage + error over two lines and a traceback-free exit 2; keep it one line
    print(f"tinysd: error: {message} (see --help)", file=sys.stderr)
    raise SystemExit(2)

def a1111_parameters(prompt:str, negative:str, steps:int, sampler:str, guidance:float, seed:int, width:int, height:int, model:str, **extra) -> str:
  """The `parameters` text chunk AUTOMATIC1111 writes, which image browsers parse."""
  head = prompt + (f"\nNegative prompt: {negative}" if negative else "")
  fields = {"Steps": steps, "Sampler": SAMPLER_LABELS.get(sampler, sampler), "CFG scale": guidance, "Seed": seed, "Size": f"{width}x{height}",
            "Model": Path(str(model)).stem, **extra}
  return head + "\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())

def save_png_atomic(image, path:Path, parameters:str):
  from PIL.PngImagePlugin import PngInfo
  info = PngInfo()
  info.add_text("parameters", parameters)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f: image.save(f, format="PNG", pnginfo=info)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise

def output_paths(output:str, n:int) -> list[Path]:
  p = Path(output)
  if p.suffix.lower() != ".png": raise UsageError(f"output must be a .png path, got '{output}'")
  return [p] if n == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]

def resolve_model(model:str) -> str:
  """A local file/folder, or a Hugging Face repo id fetched into the standard HF cache when huggingface_hub is installed."""
  if os.path.exists(model): return model
  looks_like_repo = model.count("/") == 1 and not model.endswith((".safetensors", ".ckpt")) and not model.startswith((".", "/", "~"))
  if not looks_like_repo: raise UsageError(f"model path '{model}' does not exist")
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise UsageError(f"'{model}' is not a local path and huggingface_hub is not installed; pass --model /path/to/model.safetensors "
                     f"(or a diffusers folder), or `pip install huggingface_hub` to download it") from None
  patterns = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              "text_encoder*/model.safetensors"]
  try:
    return snapshot_download(model, allow_patterns=patterns)
  except Exception as e:
    raise UsageError(f"could not fetch '{model}' from the Hugging Face Hub ({type(e).__name__}); pass --model with a local .safetensors file "
                     f"or diffusers folder") from None

def _common(p:argparse.ArgumentParser, image=False, mask=False):
  p.add_argument("--model", default=os.environ.get("TINYSD_MODEL", DEFAULT_MODEL),
                 help="single-file .safetensors, diffusers folder, or Hub repo id (default: $TINYSD_MODEL or %(default)s)")
  p.add_argument("--prompt", required=True)
  p.add_argument("--negative-prompt", default="")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; 1 disables CFG")
  p.add_argument("--sampler", default="euler_a" if not image else "ddim", help="plms, ddim, euler, euler_a, dpm++2m, dpm++2m_karras")
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
  check_generation_args(a.width, a.height, a.steps, a.guidance, a.sampler, a.batch)
  paths = output_paths(a.output, a.batch)
  seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
  pipe = _load(a)
  t0 = time.perf_counter()
  images = pipe.txt2img(a.prompt, a.negative_prompt, steps=a.steps, guidance_scale=a.guidance, width=a.width, height=a.height, seed=seed,
                        sampler=a.sampler, batch_size=a.batch, progress=True)
  _warn_truncated(pipe)
  for i, (im, p) in enumerate(zip(images, paths)):
    save_png_atomic(im, p, a1111_parameters(a.prompt, a.negative_prompt, a.steps, a.sampler, a.guidance, seed + i, a.width, a.height, a.model))
    print(f"wrote {p}")
  print(f"done in {time.perf_counter()-t0:.1f} s", file=sys.stderr)
  return 0

def cmd_img2img(a, inpaint=False) -> int:
  from tinysd.pipeline import check_generation_args, check_strength
  from tinysd.images import load_image, inpaint_mask
  check_strength(a.strength)
  init = load_image(a.image)
  h, w = init.shape[:2]
  check_generation_args(w, h, a.steps, a.guidance, a.sampler, a.batch)
  mask = inpaint_mask(a.image, a.mask, (w, h)) if inpaint else None
  paths = output_paths(a.output, a.batch)
  seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
  pipe = _load(a)
  kw = dict(negative_prompt=a.negative_prompt, strength=a.strength, steps=a.steps, guidance_scale=a.guidance, seed=seed, sampler=a.sampler,
            batch_size=a.batch, progress=True)
  images = pipe.inpaint(a.prompt, init, mask, **kw) if inpaint else pipe.img2img(a.prompt, init, **kw)
  _warn_truncated(pipe)
  for i, (im, p) in enumerate(zip(images, paths)):
    extra = {"Denoising strength": a.strength} | ({"Mask": "yes"} if inpaint else {})
    save_png_atomic(im, p, a1111_parameters(a.prompt, a.negative_prompt, a.steps, a.sampler, a.guidance, seed + i, w, h, a.model, **extra))
    print(f"wrote {p}")
  return 0

def _load(a):
  import tinysd
  if a.attention_chunk < 0: raise UsageError(f"--attention-chunk must be >= 0, got {a.attention_chunk}")
  if a.vae_tile is not None and a.vae_tile < 0: raise UsageError(f"--vae-tile must be >= 0, got {a.vae_tile}")
  pipe = tinysd.load(resolve_model(a.model), dtype=a.dtype, lowmem=a.lowmem, quant=a.quant, compute_dtype=a.compute_dtype)
  pipe.attention_chunk = a.attention_chunk or None
  pipe.compress_shortcuts = a.compress_shortcuts
  if a.vae_tile is not None: pipe.vae_tile = a.vae_tile or None
  return pipe

def _warn_truncated(pipe):
  if (n := max(pipe.last_truncated, default=0)) > 0:
    print(f"tinysd: warning: prompt is longer than 77 tokens; {n} tokens were dropped", file=sys.stderr)

def cmd_info(a) -> int:
  from tinysd.checkpoint import read_checkpoint
  ck = read_checkpoint(a.model)
  print(ck.describe())
  return 0

def cmd_convert(a) -> int:
  from tinysd.checkpoint import convert
  if a.quant:
    from tinysd.quantize import convert_quantized
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
  sub.add_parser("bench", help="benchmark on random weights at real sizes (tinysd bench --help)", add_help=False)   # dispatched in main()
  return p

def main(argv:list[str]|None=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["bench"]:   # its own parser (tinysd/bench.py), --help included
    from tinysd.bench import main as bench_main
    return bench_main(argv[1:])
  args = build_parser().parse_args(argv)
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

if __name__ == "__main__": sys.exit(main())
