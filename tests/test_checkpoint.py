# Checkpoint reading/writing against diffusers/transformers as the oracle: tiny random pipelines saved as diffusers folders and as
# CompVis single files must load into exactly the torch models' tensors, with the family and config detected; export must round-trip
# through diffusers' own from_single_file / from_pretrained; every broken input must raise CheckpointError naming the problem.
import json, os, pathlib, pickle, shutil, zipfile
from dataclasses import replace
from types import SimpleNamespace
import numpy as np, pytest, torch
from safetensors.numpy import load_file as np_load, save_file as np_save
from tinygrad import Tensor, dtypes, GlobalCounters
from tinygrad.uop.ops import Ops
from fixtures import make_tiny_pipeline, make_tiny_pipeline_folder, make_tiny_single_file, compvis_state_dict, _hf_clip
from tinysd.checkpoint import (CheckpointError, read_checkpoint, read_diffusers_config, write_single_file, write_diffusers_folder, convert,
                               read_safetensors, write_safetensors)
from tinysd.ckpt_pickle import load_torch_zip

FAMILIES = ["sd1", "sd2", "sdxl", "sd1-inpaint"]

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  cache = {}
  def get(name:str):
    if name not in cache:
      fam, inpaint, d = name.removesuffix("-inpaint"), name.endswith("-inpaint"), tmp_path_factory.mktemp(name)
      pipe = make_tiny_pipeline(fam, inpaint)
      folder, single = make_tiny_pipeline_folder(d/"folder", pipeline=pipe), make_tiny_single_file(d/"model.safetensors", pipeline=pipe)
      cache[name] = SimpleNamespace(name=name, family=fam, folder=folder, single=single, pipe=pipe, dir=d)
    return cache[name]
  return get

def torch_state(pipe, component:str) -> dict[str, torch.Tensor]:
  m = getattr(pipe, component)
  return _hf_clip(m) if component.startswith("text_encoder") else m.state_dict()

def torch_states(pipe) -> dict[str, dict[str, torch.Tensor]]:
  return {c: torch_state(pipe, c) for c in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}

def assert_same_tensors(ck, pipe, cast=lambda v: v.float().numpy(), keys=None, every=1):
  # every tensor (or those named in keys, or every n-th) equal, bit for bit, to the torch model's after cast; all names and shapes
  want = torch_states(pipe)
  assert sorted(ck.state_dicts) == sorted(want)
  for c, w in want.items():
    got = ck.state_dicts[c]
    assert got.keys() == w.keys(), (c, sorted(got.keys() ^ w.keys())[:5])
    assert all(got[k].shape == w[k].shape for k in w), c
    ks = [k for i, k in enumerate(w) if (keys is None or k in keys) and i % every == 0]
    reps = [got[k].bitcast(dtypes.uint16) if got[k].dtype == dtypes.bfloat16 else got[k] for k in ks]
    if reps: Tensor.realize(*reps)   # one schedule for all (realising one at a time is quadratic in tinygrad)
    for k, r in zip(ks, reps):
      a, b = r.numpy(), cast(w[k])
      assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b), f"{c}.{k}"

def same_but_sample_size(a, b) -> bool:
  return replace(a, unet=replace(a.unet, sample_size=0), vae=replace(a.vae, sample_size=0)) == \
         replace(b, unet=replace(b.unet, sample_size=0), vae=replace(b.vae, sample_size=0))

# ---- layouts ----

@pytest.mark.parametrize("name", FAMILIES)
def test_diffusers_folder(tiny, name):
  t = tiny(name)
  ck = read_checkpoint(t.folder)
  assert ck.config.family == name and ck.layout == "diffusers"
  assert ck.config == read_diffusers_config(t.folder)
  u, p = ck.config.unet, t.pipe.unet.config
  assert (u.in_channels, u.block_out_channels, u.layers_per_block, u.cross_attention_dim) == \
         (p.in_channels, tuple(p.block_out_channels), p.layers_per_block, p.cross_attention_dim)
  assert ck.tokenizer_dirs == [str(t.folder/d) for d in ("tokenizer", "tokenizer_2")[:len(ck.config.text_encoders)]]
  assert_same_tensors(ck, t.pipe, every=7)   # names are the files' own (but for the text_model. prefix): values of a sample suffice

@pytest.mark.parametrize("name", FAMILIES)
def test_compvis_single_file(tiny, name):
  t = tiny(name)
  ck = read_checkpoint(t.single)
  assert ck.config.family == name and ck.layout == "single-file" and ck.tokenizer_dirs is None
  # everything the weights determine (and the family conventions the fixtures follow) is detected; sample_size is not in the weights
  assert same_but_sample_size(ck.config, read_diffusers_config(t.folder))
  assert_same_tensors(ck, t.pipe)   # in particular not the model_ema.* copies, which differ
  assert name in ck.describe()

def test_single_file_config_override(tiny):
  t = tiny("sd2")
  ck = read_checkpoint(t.single, config=t.folder)
  assert ck.config == read_diffusers_config(t.folder)
  # heads are not in the weights: an explicit config wins over the family convention
  cfg = replace(ck.config, unet=replace(ck.config.unet, attention_head_dim=(4, 8)))
  assert read_checkpoint(t.single, config=cfg).config.unet.heads() == (4, 8)
  with pytest.raises(CheckpointError, match="shape mismatch"):
    read_checkpoint(t.single, config=replace(cfg, unet=replace(cfg.unet, cross_attention_dim=64)))
  with pytest.raises(CheckpointError, match="config is for sdxl"):
    read_checkpoint(t.single, config=tiny("sdxl").folder)

def test_lazy_disk_tensors(tiny):
  t = tiny("sdxl")
  for path in (t.folder, t.single):
    before = GlobalCounters.mem_used
    ck = read_checkpoint(path, dtype="float16")
    assert GlobalCounters.mem_used == before   # nothing was read or allocated
    for sd in ck.state_dicts.values():
      for v in sd.values():
        assert not v.uop.is_realized and v.dtype == dtypes.float16
        assert any(u.op is Ops.BUFFER and str(u.device).startswith("DISK") for u in v.uop.toposort())
  q = ck.state_dicts["text_encoder_2"]["text_model.encoder.layers.1.self_attn.v_proj.weight"]   # a slice of the packed in_proj
  assert np.array_equal(q.numpy(), torch_state(t.pipe, "text_encoder_2")["text_model.encoder.layers.1.self_attn.v_proj.weight"].half().numpy())

# ---- dtypes ----

HALF_SAMPLE = ["conv_in.weight", "mid_block.attentions.0.proj_in.weight", "text_model.encoder.layers.0.self_attn.k_proj.bias",
               "text_projection.weight", "decoder.mid_block.attentions.0.to_q.weight", "text_model.embeddings.position_embedding.weight"]

@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_stored_single_file(tiny, stored):
  t = tiny("sdxl")
  path, pipe = make_tiny_single_file(t.dir/f"{stored}.safetensors", "sdxl", dtype=stored, pipeline=t.pipe), t.pipe
  ck = read_checkpoint(path, dtype="float32")
  assert set(ck.stored_dtypes.values()) == {{torch.float16: "float16", torch.bfloat16: "bfloat16"}[stored]}
  assert_same_tensors(ck, pipe, cast=lambda v: v.to(stored).float().numpy(), keys=HALF_SAMPLE)
  kept = read_checkpoint(path, dtype=None)
  assert {v.dtype for sd in kept.state_dicts.values() for v in sd.values()} == {dtypes.half if stored == torch.float16 else dtypes.bfloat16}
  bits = (lambda v: v.to(stored).view(torch.int16).numpy().view(np.uint16)) if stored == torch.bfloat16 else (lambda v: v.to(stored).numpy())
  assert_same_tensors(kept, pipe, cast=bits, keys=HALF_SAMPLE)

def test_cast_on_request(tiny):
  t = tiny("sd1")
  keys = ["conv_in.weight", "text_model.final_layer_norm.bias", "decoder.mid_block.attentions.0.to_out.0.weight",
          "text_model.embeddings.token_embedding.weight"]
  for dt, cast in (("float16", lambda v: v.half().numpy()), ("bfloat16", lambda v: v.bfloat16().view(torch.int16).numpy().view(np.uint16))):
    assert_same_tensors(read_checkpoint(t.single, dtype=dt), t.pipe, cast=cast, keys=keys)   # round to nearest even, like torch

def test_fp16_variant_sharded_folder(tmp_path, tiny):
  t = tiny("sd1")
  folder = make_tiny_pipeline_folder(tmp_path/"f", dtype=torch.float16, variant="fp16", max_shard_size="1MB", pipeline=t.pipe)
  assert list((folder/"unet").glob("*.index.fp16.json")) and len(list((folder/"unet").glob("*.fp16-0*.safetensors"))) > 1
  ck = read_checkpoint(folder, dtype="float16")
  assert set(ck.stored_dtypes.values()) == {"float16"}
  assert_same_tensors(ck, t.pipe, cast=lambda v: v.half().numpy(), every=3)

def test_hub_quirks_in_folder(tmp_path, tiny):
  # Hub text encoders carry text_model.* (+ an int64 position_ids buffer); old diffusers VAEs use query/key/value/proj_attn and some
  # converted ones keep CompVis' first_stage_model. prefix; older folders hold pickled .bin weights
  t = tiny("sd1")
  folder = pathlib.Path(shutil.copytree(t.folder, tmp_path/"hub"))
  te = np_load(folder/"text_encoder"/"model.safetensors")
  te = {"text_model." + k: v for k, v in te.items()} | {"text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]}
  np_save(te, folder/"text_encoder"/"model.safetensors")
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  vae = {}
  for k, v in np_load(folder/"vae"/"diffusion_pytorch_model.safetensors").items():
    for a, b in old.items(): k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
    vae[("first_stage_model." if k.startswith("decoder.") else "") + k] = v
  assert any("proj_attn" in k for k in vae)
  np_save(vae, folder/"vae"/"diffusion_pytorch_model.safetensors")
  (folder/"unet"/"diffusion_pytorch_model.safetensors").unlink()
  torch.save(t.pipe.unet.state_dict(), folder/"unet"/"diffusion_pytorch_model.bin")
  assert_same_tensors(read_checkpoint(folder), t.pipe, every=3)

# ---- export round trips ----

PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}

def assert_same_torch(a, b, cast=lambda v: v):
  for c in ("unet", "vae", "text_encoder", "text_encoder_2"):
    if getattr(a, c, None) is None: continue
    sa, sb = getattr(a, c).state_dict(), getattr(b, c).state_dict()
    assert sa.keys() == sb.keys(), c
    for k in sa: assert torch.equal(cast(sa[k]), sb[k]), f"{c}.{k}"

@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_folder_to_single_file_through_diffusers(tmp_path, tiny, name):
  import diffusers
  t = tiny(name)
  out = tmp_path/"out.safetensors"
  convert(t.folder, out)
  cls = getattr(diffusers, PIPELINES[name])
  got = cls.from_single_file(str(out), config=str(t.folder), local_files_only=True)
  assert_same_torch(t.pipe, got)
  ck = read_checkpoint(out)   # our own file: the config travels in __metadata__, exactly
  assert ck.config == read_diffusers_config(t.folder)
  assert_same_tensors(ck, t.pipe, keys=["conv_in.weight", "text_model.embeddings.token_embedding.weight"])
  assert not [p for p in tmp_path.iterdir() if p.name != "out.safetensors"]   # no temp files left

def test_single_file_to_folder_through_diffusers(tmp_path, tiny):
  import diffusers
  t = tiny("sdxl")
  convert(t.single, tmp_path/"folder")
  got = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path/"folder", local_files_only=True)
  assert_same_torch(t.pipe, got)
  assert got.tokenizer("a photo of a cat").input_ids == t.pipe.tokenizer("a photo of a cat").input_ids
  assert (got.tokenizer.pad_token, got.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
  with pytest.raises(CheckpointError, match="already exists"): convert(t.single, tmp_path/"folder")

def test_metadata_keeps_unconventional_config(tmp_path, tiny):
  t = tiny("sd1")
  ck = read_checkpoint(t.folder, dtype=None)
  cfg = replace(ck.config, unet=replace(ck.config.unet, attention_head_dim=(2, 4, 4), sample_size=12))
  write_single_file(ck.state_dicts, cfg, tmp_path/"m.safetensors")
  back = read_checkpoint(tmp_path/"m.safetensors", dtype=None)
  assert back.config == cfg
  assert_same_tensors(back, t.pipe, keys=["conv_in.weight", "decoder.mid_block.attentions.0.to_v.weight", "text_model.encoder.layers.1.mlp.fc2.bias"])

@pytest.mark.parametrize("out", ["float16", "bfloat16", None])
def test_write_safetensors_dtypes(tmp_path, out):
  from safetensors.torch import load_file, save_file
  src = {"f32": torch.randn(7, 5) * 1e3, "f16": torch.randn(33).half(), "bf16": torch.randn(4, 4).bfloat16(), "i64": torch.arange(3)}
  src["f32"][0, :3] = torch.tensor([float("nan"), float("inf"), 1 + 2**-9])   # NaN, inf and a bf16 rounding tie
  save_file(src, tmp_path/"in.safetensors")
  tensors, _ = read_safetensors(tmp_path/"in.safetensors")
  write_safetensors({k: v if k != "f32" else v.T for k, v in tensors.items()}, tmp_path/"out.safetensors", {"a": "b"}, dtype=out)
  got = load_file(tmp_path/"out.safetensors")
  for k, v in src.items():
    want = v.T if k == "f32" else v
    if out and want.is_floating_point(): want = want.to(getattr(torch, out))   # torch rounds to nearest even too
    torch.testing.assert_close(got[k], want, rtol=0, atol=0, equal_nan=True, msg=k)

def test_write_rejects_bad_state_dicts(tmp_path, tiny):
  t = tiny("sd1")
  ck = read_checkpoint(t.folder)
  sds = {c: dict(sd) for c, sd in ck.state_dicts.items()}
  del sds["unet"]["conv_in.bias"]
  sds["vae"]["decoder.conv_out.bias"] = Tensor.zeros(5)
  with pytest.raises(CheckpointError, match=r"unet: 1 missing keys \(conv_in.bias\)"): write_single_file(sds, ck.config, tmp_path/"x.safetensors")
  sds["unet"]["conv_in.bias"] = ck.state_dicts["unet"]["conv_in.bias"]
  with pytest.raises(CheckpointError, match=r"vae: shape mismatch for decoder.conv_out.bias: checkpoint has \(5,\), config expects \(3,\)"):
    write_diffusers_folder(sds, ck.config, tmp_path/"folder")
  assert not list(tmp_path.iterdir())

# ---- pickles ----

def test_ckpt_through_strict_unpickler(tmp_path, tiny):
  t = tiny("sd1")
  sd = compvis_state_dict(t.pipe, "sd1")
  k = "model.diffusion_model.out.2.weight"
  sd[k] = sd[k].permute(1, 0, 3, 2).contiguous().permute(1, 0, 3, 2)   # torch.save keeps these strides
  assert not sd[k].is_contiguous()
  lightning = {"global_step": 7, "epoch": np.float32(1.5), "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5)}}}
  torch.save({"state_dict": sd} | lightning, tmp_path/"model.ckpt")
  assert_same_tensors(read_checkpoint(tmp_path/"model.ckpt"), t.pipe)
  raw = load_torch_zip(tmp_path/"model.ckpt")
  assert raw["model_ema.num_updates"].dtype == dtypes.int32
  assert raw["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == dtypes.int64

class _Evil:
  def __init__(self, fn, *args): self.fn, self.args = fn, args
  def __reduce__(self): return self.fn, self.args

def _torch_zip(path, payload:bytes):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", payload); z.writestr("archive/byteorder", "little"); z.writestr("archive/version", "3\n")

@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "runstring", "protocol0", "inside_state_dict"])
def test_crafted_pickle_rejected_without_running(tmp_path, how):
  marker = tmp_path/"pwned"
  cmd = f"touch {marker}"
  code = f"open({str(marker)!r}, 'w').write('x')"
  import numpy.testing._private.utils as npu
  payload = {"os.system": lambda: pickle.dumps({"state_dict": _Evil(os.system, cmd)}, protocol=4),
             "builtins.exec": lambda: pickle.dumps(_Evil(exec, code), protocol=2),
             "runstring": lambda: pickle.dumps(_Evil(npu.runstring, code, {}), protocol=2),   # the numpy-rooted gadget tinygrad's torch_load runs
             "protocol0": lambda: f"cos\nsystem\n(S'{cmd}'\ntR.".encode(),
             "inside_state_dict": lambda: pickle.dumps({"state_dict": {"a": 1, "b": [_Evil(os.system, cmd)]}}, protocol=2)}[how]()
  _torch_zip(tmp_path/"evil.ckpt", payload)
  with pytest.raises(CheckpointError, match="refusing to unpickle"): read_checkpoint(tmp_path/"evil.ckpt")
  (tmp_path/"legacy.ckpt").write_bytes(payload if payload[:1] == b"\x80" else pickle.dumps(_Evil(os.system, cmd), protocol=2))
  with pytest.raises(CheckpointError, match="legacy"): read_checkpoint(tmp_path/"legacy.ckpt")
  assert not marker.exists()

# ---- errors ----

def _edit_single(src, dst, drop=(), add=None):
  sd = {k: v for k, v in np_load(src).items() if k not in drop}
  np_save(sd | (add or {}), dst)
  return dst

def test_errors(tmp_path, tiny):
  t = tiny("sd1")
  data = t.single.read_bytes()
  n = int.from_bytes(data[:8], "little")
  def bad(name, content:bytes|None=None, match="", **kw):
    p = tmp_path/name
    if content is not None: p.write_bytes(content)
    before = GlobalCounters.mem_used
    with pytest.raises(CheckpointError, match=match) as e: read_checkpoint(p, **kw)
    assert GlobalCounters.mem_used == before and "\n" not in str(e.value)   # nothing loaded; one-line message
    return str(e.value)
  bad("missing.safetensors", None, "no such file")
  bad("cut.safetensors", data[:len(data)//2], "truncated safetensors file")
  bad("cut_header.safetensors", data[:n//2], r"truncated or corrupted safetensors file \(header length")
  bad("huge_header.safetensors", (10**9).to_bytes(8, "little") + b'{"a": 1}', "header length 1000000000 > file size")
  bad("garbage.safetensors", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a checkpoint")
  bad("bad_json.safetensors", (16).to_bytes(8, "little") + b'{"a": [1, 2,    ' + bytes(64), "corrupted safetensors header")
  bad("bad_entry.safetensors", (64).to_bytes(8, "little") + b'{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}'.ljust(64) + bytes(8),
      "corrupted safetensors header")
  bad("notes.txt", b"hello, I am not a checkpoint" * 10, "not a checkpoint")
  bad("image.png", b"\x89PNG\r\n\x1a\n" + bytes(100), "not a checkpoint")
  bad("empty.safetensors", b"", "not a checkpoint")
  (tmp_path/"emptydir").mkdir(); bad("emptydir", None, "not a checkpoint")
  np_save({"foo.weight": np.zeros(3, np.float32)}, tmp_path/"other.safetensors"); bad("other.safetensors", None, "unknown key layout")
  shutil.copy(t.folder/"unet"/"diffusion_pytorch_model.safetensors", tmp_path/"unet.safetensors")
  bad("unet.safetensors", None, "single model component")
  unet = {k: v for k, v in np_load(t.single).items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
  np_save(unet | {"conditioner.embedders.0.model.token_embedding.weight": np.zeros((4, 4), np.float32)}, tmp_path/"refiner.safetensors")
  bad("refiner.safetensors", None, "unsupported family: SDXL refiner")
  np_save(unet, tmp_path/"no_te.safetensors"); bad("no_te.safetensors", None, "unsupported family")
  _edit_single(t.single, tmp_path/"missing.safetensors", drop=("model.diffusion_model.out.2.bias", "first_stage_model.decoder.conv_in.bias"))
  msg = bad("missing.safetensors", None, "2 missing keys")
  assert "first_stage_model.decoder.conv_in.bias" in msg and "model.diffusion_model.out.2.bias" in msg
  _edit_single(t.single, tmp_path/"extra.safetensors", add={"model.diffusion_model.extra.weight": np.zeros(2, np.float32),
                                                            "cond_stage_model.transformer.text_model.foo": np.zeros(2, np.float32)})
  bad("extra.safetensors", None, r"2 unexpected keys \(cond_stage_model.transformer.text_model.foo, model.diffusion_model.extra.weight\)")
  _edit_single(t.single, tmp_path/"shape.safetensors", add={"first_stage_model.decoder.conv_out.bias": np.zeros(5, np.float32)})
  bad("shape.safetensors", None, r"shape mismatch for first_stage_model.decoder.conv_out.bias: checkpoint has \(5,\), config expects \(3,\)")
  w = np_load(t.single)["model.diffusion_model.input_blocks.0.0.weight"]
  _edit_single(t.single, tmp_path/"ch8.safetensors", add={"model.diffusion_model.input_blocks.0.0.weight": np.zeros((w.shape[0], 8, 3, 3), "f4")})
  bad("ch8.safetensors", None, "unsupported UNet with 8 input channels")
  with pytest.raises(CheckpointError, match="unknown dtype"): read_checkpoint(t.single, dtype="int8")

def test_folder_errors(tmp_path, tiny):
  t = tiny("sd1")
  folder = pathlib.Path(shutil.copytree(t.folder, tmp_path/"f"))
  f = folder/"unet"/"diffusion_pytorch_model.safetensors"
  sd = np_load(f)
  np_save({k: v for k, v in sd.items() if k != "conv_out.bias"}, f)
  with pytest.raises(CheckpointError, match=r"unet: 1 missing keys \(conv_out.bias\)"): read_checkpoint(folder)
  np_save(sd, f)
  cfg = json.loads((folder/"unet"/"config.json").read_text())
  (folder/"unet"/"config.json").write_text(json.dumps(cfg | {"cross_attention_dim": 64}))
  with pytest.raises(CheckpointError, match=r"unet: shape mismatch for down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight: "
                                            r"checkpoint has \(32, 128\), config expects \(32, 64\) \(\d+ mismatched tensors\)"):
    read_checkpoint(folder)
  (folder/"unet"/"config.json").write_text(json.dumps(cfg))
  f.unlink()
  with pytest.raises(CheckpointError, match="no weights found"): read_checkpoint(folder)
  shutil.rmtree(folder/"vae")
  with pytest.raises(CheckpointError, match="vae"): read_checkpoint(folder)

# ---- real-size layouts (meta tensors: names and shapes only, no memory) ----

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_size_layouts_match_diffusers(family):
  # SD1.5 / SD2.1 / SDXL base configs: our expected names and shapes are what diffusers/transformers build, diffusers' own single-file
  # converters turn our CompVis names (with the shapes real files have) into exactly those, and config inference recovers the config
  import diffusers, transformers
  from diffusers.loaders import single_file_utils as sfu
  from tinysd.checkpoint import TEMPLATES, component_shapes, compvis_layout, diffusers_configs, infer_config, _ldm_shape
  cfg, dc = TEMPLATES[family], diffusers_configs(TEMPLATES[family])
  with torch.device("meta"):
    models = {"unet": diffusers.UNet2DConditionModel.from_config(dc["unet"]), "vae": diffusers.AutoencoderKL.from_config(dc["vae"])}
    for n in ("text_encoder", "text_encoder_2")[:len(cfg.text_encoders)]:
      models[n] = getattr(transformers, dc[n]["architectures"][0])(transformers.CLIPTextConfig(**dc[n]))
  states = {c: (_hf_clip(m) if c.startswith("text_encoder") else m.state_dict()) for c, m in models.items()}
  shapes = component_shapes(cfg)
  for c, sd in states.items(): assert {k: tuple(v.shape) for k, v in sd.items()} == shapes[c], c
  ldm = {k: torch.empty(_ldm_shape(shapes[c][dk], op), device="meta") for c, m in compvis_layout(cfg).items() for dk, (k, op) in m.items()}
  if family == "sd2":   # real SD2 files also hold OpenCLIP-H's last block (and its projection), unused by SD
    ldm |= {k.replace(".resblocks.22.", ".resblocks.23."): v for k, v in ldm.items() if ".resblocks.22." in k}
    ldm["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device="meta")
  assert infer_config({k: tuple(v.shape) for k, v in ldm.items()}) == cfg
  conv = {"unet": sfu.convert_ldm_unet_checkpoint(ldm, dict(models["unet"].config)),
          "vae": sfu.convert_ldm_vae_checkpoint(ldm, dict(models["vae"].config))}
  if family == "sd2": conv["text_encoder"] = sfu.convert_open_clip_checkpoint(models["text_encoder"], ldm, prefix="cond_stage_model.model.")
  else: conv["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ldm)
  if family == "sdxl":
    conv["text_encoder_2"] = sfu.convert_open_clip_checkpoint(models["text_encoder_2"], ldm, prefix="conditioner.embedders.1.model.")
  for c, sd in conv.items():
    sd = {k: v for k, v in sd.items() if not (c == "text_encoder" and family == "sd2" and k == "text_projection.weight")}
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes[c], c

def test_unused_config_fields_refused_not_ignored():
  # shift_factor (SD3/FLUX VAEs) would change every latent if honoured; tinysd has no such model, so a config that sets it is refused
  from tinysd.configs import SD15, check, ConfigError
  with pytest.raises(ConfigError, match="shift_factor 0.1159 is an SD3/FLUX VAE's"): check(replace(SD15, vae=replace(SD15.vae, shift_factor=0.1159)))
  for ok in (None, 0.0): check(replace(SD15, vae=replace(SD15.vae, shift_factor=ok)))
