# Fuzzing every reader of user files: whatever the bytes, the safetensors header parser, the config readers, the tokenizer loader and the
# image/mask loaders either return something usable or raise their one ValueError subclass (which the CLI prints as one line, exit 2),
# never a KeyError/TypeError/RecursionError traceback. Bounded (derandomized, max_examples, deadline) so CI spends ~30 s here.
import io, json, os, pathlib, shutil, struct, tempfile
import numpy as np, pytest
from hypothesis import assume, given, settings, strategies as st, HealthCheck
from PIL import Image
from tinysd.checkpoint import CheckpointError, read_safetensors, read_config, read_diffusers_config, diffusers_configs, component_shapes
from tinysd.configs import SD15, ConfigError, UNetConfig, VAEConfig, CLIPConfig, SchedulerConfig
from tinysd.images import ImageError, load_image, load_mask, inpaint_mask
from tinysd.tokenizer import CLIPTokenizer, TokenizerError, BOS, EOS

FUZZ = settings(max_examples=int(os.environ.get("TINYSD_FUZZ_EXAMPLES", 150)), deadline=None, derandomize="TINYSD_FUZZ_EXAMPLES" not in os.environ, database=None, suppress_health_check=list(HealthCheck))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)
deep = st.integers(900, 30000).map(lambda n: "[" * n + "]" * n)   # past json.loads' recursion limit (Python's 1000, tinygrad sets 10000)
deep_object = deep.map(lambda s: '{"a":' + s + '}')
SCRATCH: pathlib.Path   # one folder for the module: hypothesis runs each test many times inside one function-scoped fixture

@pytest.fixture(scope="module", autouse=True)
def _scratch():
  global SCRATCH
  SCRATCH = pathlib.Path(tempfile.mkdtemp(prefix="tinysd-fuzz-"))
  yield
  shutil.rmtree(SCRATCH, ignore_errors=True)

def st_file(data:bytes, name="f.safetensors") -> pathlib.Path:
  p = SCRATCH / name
  p.write_bytes(data)
  return p

# ---- safetensors headers ----

DTYPES = ["F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "X9", ""]
entry = st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES) | json_values, "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
                               "data_offsets": st.lists(st.integers(-4, 300), min_size=2, max_size=2) | json_values})
keys = st.sampled_from(["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x", "first_stage_model.y",
                        "__metadata__", "a"]) | st.text(max_size=10)
headers = st.dictionaries(keys, entry | json_values, max_size=5).map(lambda d: json.dumps(d).encode()) | (deep | deep_object).map(str.encode) | \
          st.binary(max_size=40)

@FUZZ
@given(header=headers, n=st.none() | st.integers(0, 2**64 - 1), pad=st.binary(max_size=300),
       meta=st.none() | st.dictionaries(st.sampled_from(["format", "tinysd_config", "tinysd.quant"]), json_values | deep | st.text(max_size=30)))
def test_safetensors_header(header, n, pad, meta):
  if meta is not None and header.startswith(b"{") and not header.startswith(b"{}"):
    try: header = json.dumps(json.loads(header) | {"__metadata__": meta}).encode()
    except (ValueError, TypeError, RecursionError): pass
  p = st_file((len(header) if n is None else n).to_bytes(8, "little") + header + pad)
  for read in (read_safetensors, read_config):
    try: read(p)
    except CheckpointError: pass

# ---- diffusers config.json files ----

TEMPLATE = diffusers_configs(SD15)   # SD1.5's real config.json files, one to three fields replaced per example
FIELDS = {"unet": [f for f in TEMPLATE["unet"] if f != "_class_name"], "vae": [f for f in TEMPLATE["vae"] if f != "_class_name"],
          "text_encoder": list(TEMPLATE["text_encoder"]), "scheduler": list(TEMPLATE["scheduler"])}
mutation = st.sampled_from(sorted(FIELDS)).flatmap(lambda c: st.tuples(st.just(c), st.sampled_from(FIELDS[c]),
                                                                       json_values | st.integers(0, 5000) | st.lists(st.integers(0, 700), max_size=5)))

@FUZZ
@given(muts=st.lists(mutation, min_size=1, max_size=3), raw=st.none() | st.sampled_from(sorted(FIELDS)).flatmap(lambda c: st.tuples(st.just(c), deep | st.text(max_size=20))))
def test_diffusers_config(muts, raw):
  cfgs = json.loads(json.dumps(TEMPLATE))
  for c, k, v in muts: cfgs[c][k] = v
  folder = SCRATCH / "pipe"
  for c, d in cfgs.items():
    if c == "model_index": continue
    (folder / c).mkdir(parents=True, exist_ok=True)
    text = json.dumps(d) if raw is None or raw[0] != c else raw[1]
    (folder / c / ("scheduler_config.json" if c == "scheduler" else "config.json")).write_text(text)
  try: cfg = read_diffusers_config(folder)
  except CheckpointError: return
  shapes = component_shapes(cfg)   # what the reader does next with a config it accepted: must not raise either
  assert all(all(isinstance(x, int) and x > 0 for x in s) for comp in shapes.values() for s in comp.values())

@FUZZ
@given(cls=st.sampled_from([UNetConfig, VAEConfig, CLIPConfig, SchedulerConfig]), d=json_values | st.dictionaries(st.text(max_size=12), json_values))
def test_config_from_any_json(cls, d):
  try: cls.from_diffusers(d)
  except ConfigError: pass

# ---- tokenizer folders ----

BYTES = list(CLIPTokenizer().byte_encoder.values())
PIECES = BYTES[:40] + [b + "</w>" for b in BYTES[:40]] + ["ab", "ab</w>", "!"]
small_vocab = st.lists(st.sampled_from(PIECES), max_size=30, unique=True)   # most bytes missing: BPE pieces outside the vocabulary

@FUZZ
@given(vocab=small_vocab.map(lambda v: ("tokens", v + [BOS, EOS])) | json_values, drop=st.sampled_from([None, BOS, EOS]),
       merges=st.lists(st.tuples(st.sampled_from(PIECES), st.sampled_from(PIECES)).map(" ".join) | st.text(max_size=6), max_size=6), special=st.dictionaries(st.sampled_from(["pad_token", "unk_token", "model_max_length"]),
                                                                                  json_values | st.sampled_from(["!", "<|nope|>", EOS])),
       text=st.text(alphabet=st.sampled_from("abc !\u00e9\u4e2d\U0001f600") | st.characters(), max_size=40), broken=st.none() | st.sampled_from(["vocab.json", "special_tokens_map.json"]).flatmap(
         lambda f: st.tuples(st.just(f), deep | st.binary(max_size=10).map(lambda b: b.decode("latin-1")))))
def test_tokenizer_folder(vocab, drop, merges, special, text, broken):
  d = SCRATCH / "tok"
  d.mkdir(exist_ok=True)
  if isinstance(vocab, tuple): vocab = {t: i for i, t in enumerate(t for t in vocab[1] if t != drop)}
  files = {"vocab.json": json.dumps(vocab), "merges.txt": "#version: 0.2\n" + "\n".join(merges), "special_tokens_map.json": json.dumps(special)}
  if broken: files[broken[0]] = broken[1]
  for name, t in files.items(): (d / name).write_text(t, encoding="utf-8", errors="surrogatepass")
  if broken is None and isinstance(vocab, dict): assume(len(vocab) > 0)
  try: tok = CLIPTokenizer.from_folder(d)
  except TokenizerError: return
  ids, _ = tok.tokenize([text])   # a tokenizer that loaded encodes any text, with ids from its vocabulary
  assert len(ids[0]) == tok.max_length and set(ids[0]) <= set(tok.encoder.values())

# ---- images and masks ----

def png(w, h, depth, ctype, raw:bytes) -> bytes:
  import zlib
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")

MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F", "YCbCr"]
FORMATS = {"PNG": ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"], "TIFF": MODES, "GIF": ["P", "L"], "JPEG": ["RGB", "L", "CMYK"],
           "WEBP": ["RGB", "RGBA"], "BMP": ["RGB", "L", "P", "1"]}

@st.composite
def image_files(draw) -> bytes:
  fmt = draw(st.sampled_from(sorted(FORMATS)))
  mode, w, h = draw(st.sampled_from(FORMATS[fmt])), draw(st.integers(1, 40)), draw(st.integers(1, 40))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  if mode == "F": im = Image.fromarray((rng.standard_normal((h, w)) * draw(st.sampled_from([1e-3, 1, 1e6]))).astype(np.float32), "F")
  elif mode == "I;16": im = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
  elif mode == "I": im = Image.fromarray(rng.integers(-2**31, 2**31, (h, w)).astype(np.int32))
  else: im = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
  if draw(st.booleans()):   # a random EXIF orientation, as phones write it
    exif = Image.Exif(); exif[0x0112] = draw(st.integers(0, 9)); im.info["exif"] = exif.tobytes()
  b = io.BytesIO()
  try: im.save(b, format=fmt, exif=im.info.get("exif", b""))
  except (OSError, ValueError, KeyError): assume(False)
  data = bytearray(b.getvalue())
  for _ in range(draw(st.integers(0, 3))):   # damage: flipped bytes, then maybe a cut
    i = draw(st.integers(0, len(data) - 1))
    data[i] = draw(st.integers(0, 255))
  return bytes(data[:draw(st.integers(1, len(data)))] if draw(st.booleans()) else data)

files = image_files() | st.binary(max_size=64) | st.builds(png, st.integers(0, 70000), st.integers(0, 70000), st.sampled_from([1, 8, 16]),
                                                            st.sampled_from([0, 2, 3, 4, 6]), st.binary(max_size=64))

@FUZZ
@given(data=files, mask=st.none() | files)
def test_image_and_mask_loaders(data, mask):
  p, q = st_file(data, "img"), st_file(mask or b"", "mask")
  try: a = load_image(p)
  except ImageError: return
  assert a.dtype == np.float32 and a.ndim == 3 and a.shape[2] == 3 and np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
  try: m = inpaint_mask(p, q if mask is not None else None, (a.shape[1], a.shape[0]))
  except ImageError: return
  assert m.shape == a.shape[:2] and set(np.unique(m)) <= {0.0, 1.0}
