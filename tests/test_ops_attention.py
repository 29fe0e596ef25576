# Split attention vs tinygrad's own Tensor.scaled_dot_product_attention (the op it replaces), and the graph rewrite that swaps it in.
# Both sides run in fp32; the split one sums the softmax in another order (per key tile, rescaled by exp(m_old - m_new)), so outputs differ
# by a few ulp of max|v| (measured <= 1e-6 at these sizes). ATOL = 2e-6 with |v| <= ~4.5 (randn) is that rounding; a wrong mask tile,
# rescale or reference is off by >= 1e-2.
import numpy as np, pytest
from tinygrad import Tensor, TinyJit, dtypes, function
from tinysd_ops import tg
from tinysd_ops.tg import PeakMemory
from tinysd_ops.attention import split_attention, install

ATOL, RTOL = 2e-6, 1e-5

def rand(*shape): return Tensor(np.random.randn(*shape).astype(np.float32)).realize()
def close(a:Tensor, b:Tensor): np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=RTOL, atol=ATOL)

@pytest.mark.parametrize("shape_q, Lk, q_chunk, k_chunk", [
  ((2, 2, 32, 8), 32, 32, 16),       # L divisible by the chunks
  ((2, 2, 24, 8), 24, 16, 16),       # not divisible: ragged last tiles
  ((2, 2, 24, 8), 77, 24, 40),       # cross-attention, k/v length 77: one query chunk, two key chunks
  ((4, 24, 8), 24, 16, 100),         # 3-D (batch*heads, L, d): query chunks only
])
def test_split_matches_sdpa(shape_q, Lk, q_chunk, k_chunk):
  q, k, v = rand(*shape_q), rand(*shape_q[:-2], Lk, shape_q[-1]), rand(*shape_q[:-2], Lk, shape_q[-1])
  close(split_attention(q, k, v, q_chunk=q_chunk, k_chunk=k_chunk), q.scaled_dot_product_attention(k, v))

def test_split_causal():
  # CLIP: causal over 77 tokens. Query tile 40..76 sees key tiles 0..39 and 40..76 (diagonal, shifted tril); query tile 0..39 skips 40..76
  q, k, v = rand(1, 2, 77, 8), rand(1, 2, 77, 8), rand(1, 2, 77, 8)
  close(split_attention(q, k, v, is_causal=True, q_chunk=40, k_chunk=40), q.scaled_dot_product_attention(k, v, is_causal=True))

def test_split_masks():
  q, k, v = rand(2, 2, 24, 8), rand(2, 2, 40, 8), rand(2, 2, 40, 8)
  # boolean (Lq, Lk): row 0 sees nothing (NaN on both sides, as SDPA), rows 1..7 only keys >= 20 (their first key tile is fully masked:
  # the -inf running-max path), the rest random
  m = np.random.rand(24, 40) > 0.5
  m[0], m[1:8, :20], m[1:8, 20] = False, False, True
  bm = Tensor(m)
  out = split_attention(q, k, v, attn_mask=bm, q_chunk=12, k_chunk=20).numpy()
  assert np.isnan(out[:, :, 0]).all() and not np.isnan(out[:, :, 1:]).any()
  np.testing.assert_allclose(out, q.scaled_dot_product_attention(k, v, attn_mask=bm).numpy(), rtol=RTOL, atol=ATOL)
  # additive, broadcast over heads and queries (a padding mask), with -inf and large finite values
  am = np.random.randn(2, 1, 1, 40).astype(np.float32) * 4
  am[0, ..., 30:] = -np.inf
  am = Tensor(am)
  close(split_attention(q, k, v, attn_mask=am, q_chunk=24, k_chunk=20), q.scaled_dot_product_attention(k, v, attn_mask=am))
  # rows whose first key tile is all -inf and the rest ~ -1000: the rescale exp(m_old - m_new) of the empty sums must not overflow
  am = np.where(np.arange(40) < 20, -np.inf, -1000 + np.random.randn(24, 40)).astype(np.float32)
  am = Tensor(am)
  close(split_attention(q, k, v, attn_mask=am, q_chunk=24, k_chunk=20), q.scaled_dot_product_attention(k, v, attn_mask=am))
  with pytest.raises(RuntimeError, match="cannot set attn_mask when is_causal"): split_attention(q, k, v, attn_mask=am, is_causal=True)

def test_split_half():
  # fp16 in, fp16 out. split runs the softmax in fp32 (plain SDPA runs it in fp16), so compare with the fp32 result at fp16 rounding
  q, k, v = rand(1, 2, 24, 8), rand(1, 2, 24, 8), rand(1, 2, 24, 8)
  ref = q.scaled_dot_product_attention(k, v).numpy()
  out = split_attention(q.half(), k.half(), v.half(), q_chunk=24, k_chunk=16)
  assert out.dtype == dtypes.half
  np.testing.assert_allclose(out.numpy(), ref, atol=4e-3)

W = [w.astype(np.float32) / 4 for w in np.random.RandomState(0).randn(4, 16, 16)]
def tiny_model(x:Tensor, ctx:Tensor, heads:int=2) -> Tensor:
  # model-like: self-attention then cross-attention (context length 77) on projections, plain SDPA on (B, heads, L, d) as the UNet does
  B, L, C = x.shape
  wq, wk, wv, wo = (Tensor(w) for w in W)
  def split_heads(t:Tensor) -> Tensor: return t.reshape(B, t.shape[1], heads, C // heads).transpose(1, 2)
  def merge(t:Tensor) -> Tensor: return t.transpose(1, 2).reshape(B, L, C) @ wo
  h = x + merge(split_heads(x @ wq).scaled_dot_product_attention(split_heads(x @ wk), split_heads(x @ wv)))
  return h + merge(split_heads(h @ wq).scaled_dot_product_attention(split_heads(ctx @ wk), split_heads(ctx @ wv)))

def test_rewrite_model_graph():
  x, ctx = rand(2, 24, 16), rand(2, 77, 16)
  ref = tiny_model(x, ctx)
  (new,), n = tg.rewrite_sdpa([ref], lambda **kw: split_attention(**kw, q_chunk=16, k_chunk=40))
  assert n == 2 and new.uop is not ref.uop
  close(new, ref)
  # install() leaves single-tile attention alone: with 32 x 64 tiles the 24 x 24 self-attention stays plain SDPA, the 24 x 77 cross is split
  assert install(ref, q_chunk=32, k_chunk=128).uop is ref.uop
  out = install(ref, q_chunk=32, k_chunk=64)
  seen = []
  assert tg.rewrite_sdpa([out], lambda **kw: seen.append(kw["k"].shape[-2]))[1] == 0 and seen == [24]
  close(out, ref)

@pytest.mark.parametrize("variant", ["causal", "bool", "add", "half"])
def test_rewrite_finds_sdpa_variants(variant):
  q, k, v = rand(1, 2, 24, 8), rand(1, 2, 24, 8), rand(1, 2, 24, 8)
  kw = {"causal": dict(is_causal=True), "bool": dict(attn_mask=Tensor(np.random.rand(24, 24) > 0.3)),
        "add": dict(attn_mask=rand(1, 1, 24, 24))}.get(variant, {})
  if variant == "half": q, k, v = q.half(), k.half(), v.half()
  ref = q.scaled_dot_product_attention(k, v, **kw) * 2
  seen = []
  (new,), n = tg.rewrite_sdpa([ref], lambda **a: seen.append(a) or split_attention(**a, q_chunk=24, k_chunk=16))
  assert n == 1 and seen[0]["is_causal"] == (variant == "causal")
  np.testing.assert_allclose(new.numpy(), ref.numpy(), rtol=RTOL, atol=4e-3 if variant == "half" else ATOL)

def test_rewrite_ignores_other_softmax():
  # same ops but not SDPA (scale 1/4 instead of 1/sqrt(8)): the rebuild check rejects it
  q, k, v = rand(1, 2, 24, 8), rand(1, 2, 24, 8), rand(1, 2, 24, 8)
  t = (q @ k.transpose(-2, -1) / 4).softmax(-1) @ v
  assert tg.rewrite_sdpa([t], lambda **a: split_attention(**a, q_chunk=8, k_chunk=8))[1] == 0

def test_install_inside_tinyjit():
  x, ctx = rand(2, 24, 16), rand(2, 77, 16)
  ref = tiny_model(x, ctx).numpy()
  left = []
  def step(x:Tensor, ctx:Tensor) -> Tensor:
    out = install(tiny_model(x, ctx), q_chunk=16, k_chunk=40)
    found = []
    tg.rewrite_sdpa([out], lambda **kw: found.append(kw))   # impl returning None: only lists the plain SDPAs left in the graph
    left.append(len(found))
    return out.realize()
  jit = TinyJit(step)
  for _ in range(3): np.testing.assert_allclose(jit(x, ctx).numpy(), ref, rtol=RTOL, atol=ATOL)   # eager, capture, replay
  assert left == [0, 0]   # the 3rd call replays the captured kernels without tracing

def peak_bytes(fn) -> int:
  # high-water mark of tinygrad's allocations while realizing fn() (notes section e): deterministic, unlike RSS or time
  with PeakMemory() as m: fn().realize()
  return m.peak

@function
def attention_fn(q:Tensor, k:Tensor, v:Tensor) -> Tensor: return q.scaled_dot_product_attention(k, v)
def chained(q:Tensor, k:Tensor, v:Tensor) -> Tensor: return q.scaled_dot_product_attention(k, v).scaled_dot_product_attention(k, v)

@pytest.mark.parametrize("attn", [Tensor.scaled_dot_product_attention, chained, attention_fn], ids=["sdpa", "chained", "in_function"])
def test_peak_memory_drops(attn):
  # the score matrix dominates: 8 heads x 256 x 256 fp32 = 2.1 MB vs 65 kB for each of q, k, v and the output. 2 x 2 tiles, so both the
  # key-tile chain and the ordering of the query chunks (each would be scheduled breadth-first, all live at once, without _after) count.
  # chained: the 2nd split's inputs contain the 1st split's FUNCTION; in_function: the SDPA sits in an @function body (a tagged model block)
  q, k, v = rand(1, 8, 256, 8), rand(1, 8, 256, 8), rand(1, 8, 256, 8)
  score, tile = 8 * 256 * 256 * 4, 8 * 128 * 128 * 4
  plain = peak_bytes(lambda: attn(q, k, v))
  split = peak_bytes(lambda: install(attn(q, k, v), q_chunk=128, k_chunk=128))
  print(f"peak: plain {plain/1e6:.2f} MB, split {split/1e6:.2f} MB, score {score/1e6:.2f} MB, tile {tile/1e6:.2f} MB")
  # plain = score + output. split: tile, exp(tile) and a third slot lost to fragmentation by the per-row state, + output and state
  assert plain >= score and split <= 3 * tile + 4 * q.nbytes(), (plain, split)
  close(install(attn(q, k, v), q_chunk=128, k_chunk=128), attn(q, k, v))
