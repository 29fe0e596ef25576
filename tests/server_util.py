# Helpers shared by the server tests: one tiny random SD1 checkpoint per pytest session, and PNG/base64 conversions.
import base64, io, shutil
import numpy as np
from PIL import Image

def tiny_model(tmp_path_factory, name="tiny.safetensors"):
  """The tiny random SD1 single file (tests/fixtures.py), written once per session and copied under other names on request."""
  base = tmp_path_factory.getbasetemp() / "tinysd-server-models"
  path = base / "tiny.safetensors"
  if not path.exists():
    from fixtures import make_tiny_single_file
    base.mkdir(exist_ok=True)
    make_tiny_single_file(base / "tmp.safetensors", family="sd1")
    (base / "tmp.safetensors").rename(path)
  if name != path.name and not (base / name).exists(): shutil.copy(path, base / name)
  return base / name

def decode(b64:str) -> Image.Image:
  im = Image.open(io.BytesIO(base64.b64decode(b64)))
  im.load()
  return im

def pixels(b64:str) -> np.ndarray: return np.asarray(decode(b64).convert("RGB"))

def encode(im:Image.Image) -> str:
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()

def smooth_image(side:int, seed:int=0) -> Image.Image:
  # a low-frequency RGB image: VAE-friendly, and every pixel differs from what a random model paints
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
  return Image.fromarray(small).resize((side, side), Image.BICUBIC)
