# Quantised pipelines: quantise-at-load, the tinysd quantised file (convert --quant) and lowmem streaming of it, errors vs the float model.
import json, subprocess, sys
import numpy as np, pytest
from fixtures import make_tiny_pipeline_folder, make_tiny_single_file
import tinysd
from tinygrad import dtypes
from tinysd.checkpoint import CheckpointError, read_checkpoint
from tinysd.pipeline import convert_quantized

SIZE = 32   # the tiny sd1 VAE downsamples by 2: 16x16 latents
KW = dict(steps=2, guidance_scale=7.5, width=SIZE, height=SIZE, sampler="ddim", output_type="np")

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_tiny_pipeline_folder(tmp_path_factory.mktemp("sd1q"), family="sd1")

@pytest.fixture(scope="module")
def qfile(folder, tmp_path_factory):
  path = tmp_path_factory.mktemp("q") / "model-int8.safetensors"
  reports = convert_quantized(folder, path, "int8", dtype="float32")
  assert reports["unet"]["count"] > 10 and reports["text_encoder"]["count"] > 5 and "vae" not in reports
  return path

def x_T(seed=3):
  return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)

def unet_out(pipe, seed=4):
  from tinygrad import Tensor
  rng = np.random.default_rng(seed)
  x, ctx = rng.standard_normal((2, 4, 8, 8), dtype=np.float32), rng.standard_normal((2, 77, 128), dtype=np.float32)
  return pipe.unet(Tensor(x), 500.0, Tensor(ctx)).numpy()

def rel(a, b): return np.linalg.norm(a - b) / np.linalg.norm(b)

def test_quantized_file_layout(qfile):
  ck = read_checkpoint(qfile)
  assert ck.layout == "quantized" and set(ck.quant) == {"unet", "text_encoder"}
  assert {m["mode"] for layers in ck.quant.values() for m in layers.values()} == {"int8"}
  assert "layers quantised (int8)" in ck.describe()
  # the int8 tensors really are int8 on disk, and conv_in (kept in full precision) is a plain float weight
  assert ck.state_dicts["unet"]["down_blocks.0.resnets.0.conv1.weight.q"].dtype == dtypes.int8
  assert "conv_in.weight" in ck.state_dicts["unet"] and "conv_in.weight.q" not in ck.state_dicts["unet"]

@pytest.mark.parametrize("mode,bar", [("int8", 0.02), ("pal8", 0.03), ("pal4", 0.25)])
def test_quantize_at_load_error_vs_float(folder, mode, bar):
  # relative error of the UNet output vs the float model: small, and not zero (the layers really were swapped)
  f, q = tinysd.load(folder), tinysd.load(folder, quant=mode)
  assert type(q.unet.down_blocks[0].resnets[0].conv1).__name__ == "QuantConv2d"
  err = rel(unet_out(q), unet_out(f))
  assert 1e-5 < err < bar, err

def test_quantized_file_matches_quantize_at_load(folder, qfile):
  # the file stores the float side tensors (scales, outliers) as fp16: the only difference to quantising at load in fp32
  a, b = tinysd.load(qfile), tinysd.load(folder, quant="int8")
  assert rel(unet_out(a), unet_out(b)) < 1e-3
  img_a, img_b = a.txt2img("a cat", latents=x_T(), **KW), b.txt2img("a cat", latents=x_T(), **KW)
  assert np.abs(img_a - img_b).max() < 2e-3

def test_lowmem_streams_quantized_file(qfile):
  full, lean = tinysd.load(qfile), tinysd.load(qfile, lowmem=True)
  assert np.array_equal(lean.txt2img("a cat", latents=x_T(5), **KW), full.txt2img("a cat", latents=x_T(5), **KW))
  q = lean.unet.down_blocks[0].resnets[0].conv1.weight.q
  assert not q.uop.is_realized   # released after use: the int8 weights are lazy reads of the file again

def test_quantized_fp16(folder, tmp_path):
  path = tmp_path / "m.safetensors"
  convert_quantized(folder, path, "pal6")   # float tensors stored fp16 by default
  ck = read_checkpoint(path, dtype=None)
  assert ck.stored_dtypes["vae"] == "float16"
  # fp16 compute on the fp16 file vs fp32 compute on the same (fp16-stored) weights: fp16 rounding only
  assert rel(unet_out(tinysd.load(path, dtype="float16", compute_dtype="float16")), unet_out(tinysd.load(path))) < 5e-3

def test_sdxl_two_text_encoders(tmp_path):
  src = make_tiny_single_file(tmp_path / "xl.safetensors", family="sdxl")
  dst = tmp_path / "xl-int8.safetensors"
  convert_quantized(src, dst, "int8", dtype="float32")
  ck = read_checkpoint(dst)
  assert set(ck.quant) == {"unet", "text_encoder", "text_encoder_2"} and ck.config.family == "sdxl"
  lat = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)   # the tiny sdxl VAE downsamples by 4
  img = tinysd.load(dst).txt2img("a cat", steps=1, width=64, height=64, sampler="euler", latents=lat, output_type="np")
  ref = tinysd.load(src, quant="int8").txt2img("a cat", steps=1, width=64, height=64, sampler="euler", latents=lat, output_type="np")
  assert np.abs(img - ref).max() < 2e-3

def test_bad_quantized_files(folder, qfile, tmp_path):
  with pytest.raises(CheckpointError, match="already quantised"): tinysd.load(qfile, quant="int8")
  with pytest.raises(ValueError, match="unknown quantisation"): convert_quantized(folder, tmp_path / "x.safetensors", "int3")
  with pytest.raises(CheckpointError, match="one .safetensors"): convert_quantized(folder, tmp_path / "x", "int8")
  # metadata naming a layer shape the config does not have
  raw = qfile.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8+n])
  quant = json.loads(header["__metadata__"]["tinysd.quant"])
  layer = next(iter(quant["unet"]))
  quant["unet"][layer]["shape"][0] += 1
  header["__metadata__"]["tinysd.quant"] = json.dumps(quant)
  hb = json.dumps(header).encode(); hb += b" " * (-len(hb) % 8)
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8+n:])
  with pytest.raises(CheckpointError, match="does not fit the config"): read_checkpoint(bad)
  trunc = tmp_path / "half.safetensors"   # a name the message's text cannot come from
  trunc.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(CheckpointError, match=r"half\.safetensors: truncated safetensors file \("): read_checkpoint(trunc)

def test_cli_convert_quant_and_info(folder, tmp_path):
  dst = tmp_path / "q.safetensors"
  r = subprocess.run([sys.executable, "-m", "tinysd.cli", "convert", str(folder), str(dst), "--quant", "int8"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert "unet:" in r.stdout and "layers int8" in r.stdout and dst.is_file()
  r = subprocess.run([sys.executable, "-m", "tinysd.cli", "info", str(dst)], capture_output=True, text=True)
  assert r.returncode == 0 and "tinysd quantised single file" in r.stdout and "layers quantised (int8)" in r.stdout
  r = subprocess.run([sys.executable, "-m", "tinysd.cli", "convert", str(folder), str(tmp_path / "o"), "--quant", "int8"], capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
