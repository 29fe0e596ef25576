import time, numpy as np, pytest, torch
from dataclasses import asdict
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel, CLIPTextModelWithProjection as HFCLIPTextModelWithProjection
from tinygrad import Tensor, dtypes
from tinygrad.nn.state import get_state_dict, load_state_dict
from tinysd.configs import CLIPConfig, SD15, SD2, SDXL
from tinysd.models.clip import CLIPTextModel

EOS = 49407

def make_pair(proj:bool, dtype=dtypes.float32, **kw):
  hf_cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **kw)
  ref = (HFCLIPTextModelWithProjection if proj else HFCLIPTextModel)(hf_cfg).eval()
  # transformers 5's plain CLIPTextModel.state_dict() drops the "text_model." prefix that Hub files (and our names) carry
  sd = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in ref.state_dict().items()}
  sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
  # through the same path a diffusers folder takes (config.json keys + "architectures")
  cfg = CLIPConfig.from_diffusers({**hf_cfg.to_dict(), "architectures": [type(ref).__name__]})
  assert (cfg.projection_dim is not None) == proj
  model = CLIPTextModel(cfg)
  assert {k: tuple(v.shape) for k, v in get_state_dict(model).items()} == {k: tuple(v.shape) for k, v in sd.items()}
  load_state_dict(model, {k: Tensor(v.numpy()).cast(dtype) for k, v in sd.items()}, verbose=False)
  return ref, model

def make_ids(B:int, T:int=77, eos_at=None, pad=EOS) -> np.ndarray:
  # BOS, random words (ids < BOS), EOS at a per-row position (None: a truncated prompt with no EOS), then padding (EOS for OpenAI
  # CLIP, 0 for OpenCLIP)
  ids = np.zeros((B, T), dtype=np.int64) + np.array(pad).reshape(-1, 1)   # pad: one id or one per row
  for b in range(B):
    e = eos_at[b] if eos_at is not None else np.random.randint(2, T)
    ids[b, 0], ids[b, 1:e if e is not None else T] = 49406, np.random.randint(0, EOS - 1, size=(e if e is not None else T) - 1)
    if e is not None: ids[b, e] = EOS
  return ids

def reference(ref, ids:np.ndarray):
  with torch.no_grad():
    out = ref(torch.from_numpy(ids), output_hidden_states=True)
    # CLIPTextModelWithProjection returns no pooler_output; its inner text_model does (same weights, same rule)
    return out, (ref.text_model(torch.from_numpy(ids)) if isinstance(ref, HFCLIPTextModelWithProjection) else out).pooler_output

def run(model, ids:np.ndarray):
  out = model(Tensor(ids))
  Tensor.realize(*[t for t in out if t is not None])
  return out

def maxdiff(a:Tensor, b:torch.Tensor) -> float: return float(np.abs(a.float().numpy() - b.float().numpy()).max())

@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [2, EOS])
@pytest.mark.parametrize("proj", [False, True])
def test_parity_tiny(act, eos_token_id, proj):
  ref, model = make_pair(proj, hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, hidden_act=act,
                         eos_token_id=eos_token_id, projection_dim=24)
  # EOS padding (OpenAI) and 0 padding (OpenCLIP) rows; the last row, a raw id list with neither BOS nor EOS, tells the two
  # pooling rules apart: legacy argmax picks its largest word, the first-EOS rule position 0
  ids = make_ids(5, eos_at=[5, 76, 30, 1, None], pad=[EOS, EOS, 0, 0, 0])
  ids[4, 0] = 320
  assert ids[4].argmax() != 0
  out, pooled_ref = reference(ref, ids)
  ours = run(model, ids)
  assert ours.last_hidden_state.shape == (5, 77, 32) and ours.last_hidden_state.dtype == dtypes.float32
  assert maxdiff(ours.last_hidden_state, out.last_hidden_state) < 1e-4
  assert maxdiff(ours.penultimate_hidden_state, out.hidden_states[-2]) < 1e-4
  assert maxdiff(ours.pooled, pooled_ref) < 1e-4
  if proj: assert ours.text_embeds.shape == (5, 24) and maxdiff(ours.text_embeds, out.text_embeds) < 1e-4
  else: assert ours.text_embeds is None
  # pooled must be exactly the last_hidden_state row picked by transformers' rule, written out in numpy here
  eos_pos = ids.argmax(-1) if eos_token_id == 2 else (ids == EOS).argmax(-1)
  np.testing.assert_array_equal(ours.pooled.numpy(), ours.last_hidden_state.numpy()[np.arange(5), eos_pos])

def test_fp16():
  # weights cast to half vs the fp32 reference. Bound: the fp16 rounding noise of this very model, measured as torch's own
  # fp16-vs-fp32 max error on the same weights and ids (~3e-3..6e-3 here, i.e. ~10 ulps of the O(1) outputs); ours may be at
  # most 2x that (measured: 0.9x-1.15x). A broken half path (overflow, a dtype lost or mixed) is off by orders of magnitude.
  ref, model = make_pair(True, dtype=dtypes.half, hidden_size=64, intermediate_size=256, num_hidden_layers=5, num_attention_heads=4,
                         hidden_act="gelu", eos_token_id=EOS, projection_dim=64)
  ids = make_ids(2, pad=0)
  out, _ = reference(ref, ids)
  ours = run(model, ids)
  with torch.no_grad(): out16 = ref.half()(torch.from_numpy(ids), output_hidden_states=True)
  assert ours.last_hidden_state.dtype == dtypes.half and ours.text_embeds.dtype == dtypes.half
  for a, b, t in [(ours.last_hidden_state, out.last_hidden_state, out16.last_hidden_state), (ours.text_embeds, out.text_embeds, out16.text_embeds),
                  (ours.penultimate_hidden_state, out.hidden_states[-2], out16.hidden_states[-2])]:
    assert np.isfinite(a.numpy()).all()
    d, d_torch = maxdiff(a, b), float((t.float() - b).abs().max())
    assert d <= 2 * d_torch, (d, d_torch)

@pytest.mark.slow
def test_parity_sd15_vit_l():
  ref, model = make_pair(False, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu", eos_token_id=2)
  ids = make_ids(2)
  st = time.perf_counter()
  out, pooled_ref = reference(ref, ids)
  print(f"\nViT-L/14 batch 2 forward (torch reference, incl. a second pass for pooled): {time.perf_counter() - st:.2f} s")
  st = time.perf_counter()
  ours = run(model, ids)
  print(f"ViT-L/14 batch 2 forward (tinygrad, first call incl. compile): {time.perf_counter() - st:.2f} s")
  st = time.perf_counter()
  run(model, ids)
  print(f"ViT-L/14 batch 2 forward (second call): {time.perf_counter() - st:.2f} s")
  assert maxdiff(ours.last_hidden_state, out.last_hidden_state) < 1e-4
  assert maxdiff(ours.penultimate_hidden_state, out.hidden_states[-2]) < 1e-4
  assert maxdiff(ours.pooled, pooled_ref) < 1e-4

@pytest.mark.slow
@pytest.mark.parametrize("cfg", [SD15.text_encoders[0], SD2.text_encoders[0], SDXL.text_encoders[1]], ids=["vit-l", "vit-h", "vit-bigg"])
def test_shipped_configs_match_transformers_layout(cfg):
  # names and shapes only (torch "meta" tensors, no memory): the Hub files for each SD family load with strict=True
  with torch.device("meta"): ref = HFCLIPTextModelWithProjection(CLIPTextConfig(**{k: v for k, v in asdict(cfg).items() if v is not None}))
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if cfg.projection_dim is not None or not k.startswith("text_projection.")}
  assert {k: tuple(v.shape) for k, v in get_state_dict(CLIPTextModel(cfg)).items()} == ref_shapes
