# A1111 prompt syntax (tinysd/prompt.py) and the pipeline's conditioning built on it: parsed (text, weight) runs pinned on A1111's
# documented examples, chunking on the real CLIP tokenizer, emphasis against numpy, chunked contexts against transformers' CLIPTextModel
# run on each chunk, CLIP skip against transformers' hidden_states, and prompts without syntax bit-identical to the one-call encoding.
import numpy as np, pytest, torch
from fixtures import make_tiny_pipeline_folder
from tinygrad import Tensor
import tinysd
from tinysd import prompt
from tinysd.pipeline import InputError, StableDiffusion
from tinysd.tokenizer import CLIPTokenizer
from tinysd_ops.tg import capture_jit

B = prompt.BREAK
PARSED = [   # A1111's parse_prompt_attention docstring examples and more, with the weights (floats, exactly) A1111 gives
  ("normal text", [("normal text", 1.0)]),
  ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
  ("(unbalanced", [("unbalanced", 1.1)]),
  ("\\(literal\\]", [("(literal]", 1.0)]),
  ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
  ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
   [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
    ("sky", 1.4641000000000006), (".", 1.1)]),
  ("[unbalanced", [("unbalanced", 0.9090909090909091)]),
  ("unbalanced]", [("unbalanced]", 1.0)]),
  ("mean (girl:1.6) BREAK", [("mean ", 1.0), ("girl", 1.6), ("", 1.0), B, ("", 1.0)]),
  ("", [("", 1.0)]),
  ("a BREAK b", [("a", 1.0), B, ("b", 1.0)]),
  ("a\nBREAK\nb", [("a", 1.0), B, ("b", 1.0)]),
  ("BREAK a", [("", 1.0), B, ("a", 1.0)]),
  ("x BREAK BREAK y", [("x", 1.0), B, ("", 1.0), B, ("y", 1.0)]),
  ("fooBREAKbar BREAKer", [("fooBREAKbar BREAKer", 1.0)]),   # BREAK only as a word of its own
  ("((a)) [[b]]", [("a", 1.2100000000000002), (" ", 1.0), ("b", 0.8264462809917354)]),
  ("[[[x]]]", [("x", 0.7513148009015777)]),
  ("((a", [("a", 1.2100000000000002)]),
  ("(a: 1.5 ) b", [("a", 1.5), (" b", 1.0)]),
  ("(a:-1.5) b", [("a", -1.5), (" b", 1.0)]),
  ("(a:0.0)", [("a", 0.0)]),
  ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 0.9090909090909091)]),   # ( and [ close independently
  ("(masterpiece:1.2), best quality, (1girl)", [("masterpiece", 1.2), (", best quality, ", 1.0), ("1girl", 1.1)]),
  ("a\\b \\\\ c", [("ab \\ c", 1.0)]),   # a backslash escaping nothing vanishes; \\ is one backslash
  ("x:1.2) y", [("x:1.2) y", 1.0)]),
  ("time: 12:30", [("time: 12:30", 1.0)]),
  # where tinysd departs from A1111 on purpose: BREAK inside brackets stays a chunk break (A1111 turns it into the word "break" with
  # weight -1.1), and an unparsable weight is literal text (A1111 raises ValueError)
  ("x (y BREAK z)", [("x ", 1.0), ("y", 1.1), B, ("z", 1.1)]),
  ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),
]

@pytest.mark.parametrize("text,want", PARSED)
def test_parse(text, want):
  got = prompt.parse(text)
  assert got == want and all(type(w) is float for _, w in got), got

@pytest.fixture(scope="module")
def tok(): return CLIPTokenizer()

def lens(tok, text, **kw): return [len(ids) for ids, _ in prompt.chunks(prompt.parse(text), tok, **kw)]

def test_chunks(tok):
  assert tok.encode("cat , dog")[1:-1] == [2368, 267, 1929]   # one token per word: the counts below are word counts
  assert lens(tok, "") == [0] and lens(tok, "cat " * 75) == [75] and lens(tok, "cat " * 76) == [75, 1] and lens(tok, "cat " * 151) == [75, 75, 1]
  # BREAK ends a chunk (one at the end adds none, one at the start leaves an empty chunk first)
  assert lens(tok, "cat BREAK dog") == [1, 1] and lens(tok, "cat dog BREAK") == [2] and lens(tok, "BREAK cat") == [0, 1]
  assert lens(tok, "cat " * 75 + "BREAK dog") == [75, 1]
  # a chunk that fills up with its last comma within 20 tokens of the end continues after that comma in the next chunk
  assert lens(tok, "cat " * 60 + ", " + "cat " * 20) == [61, 20]
  assert lens(tok, "cat " * 55 + ", " + "cat " * 29) == [56, 29]   # comma 20 tokens before the end: moved
  assert lens(tok, "cat " * 54 + ", " + "cat " * 30) == [75, 10]   # 21: not
  assert lens(tok, "cat " * 60 + ", " + "cat " * 20, backtrack=0) == [75, 6]
  assert lens(tok, "cat " * 75 + ", cat") == [75, 2]   # a comma that would be the 76th token starts the next chunk
  (ids, ws), = prompt.chunks(prompt.parse("a (red:1.5) [cat], dog"), tok)
  assert ids == tok.encode("a red cat, dog")[1:-1] and ws == [1.0, 1.5, 1 / 1.1, 1.0, 1.0]
  (a, wa), (b, wb) = prompt.chunks(prompt.parse("cat " * 74 + "(big dog)"), tok)   # weights move with their tokens
  assert len(a) == 75 and b == [1929] and wa[-1] == wb[0] == 1.1

@pytest.mark.parametrize("pad", [49407, 0])
def test_frame_is_the_tokenizers_ids(pad):
  # a prompt without syntax of <= 75 tokens: exactly the ids the tokenizer pads to 77 (SD1's EOS padding, and OpenCLIP's "!" = 0)
  tok = CLIPTokenizer(pad_token_id=pad)
  for text in ("a photo of a cat", "", "a cat!!! on a mat, 4k", "cat " * 75):
    (ids, ws), = prompt.chunks(prompt.parse(text), tok)
    framed, weights = prompt.frame(tok, ids, ws)
    assert framed == tok([text])[0] and weights == [1.0] * 77

def test_emphasis_vs_numpy():
  rng = np.random.default_rng(0)
  z, w = rng.standard_normal((3, 77, 16)).astype(np.float32), rng.uniform(0.5, 1.6, (3, 77)).astype(np.float32)
  zw = z.astype(np.float64) * w[..., None]
  want = zw * (z.astype(np.float64).mean(axis=(1, 2), keepdims=True) / zw.mean(axis=(1, 2), keepdims=True))
  np.testing.assert_allclose(prompt.emphasis(Tensor(z), Tensor(w)).numpy(), want, rtol=2e-5, atol=1e-6)

# ---- through the pipeline, tiny SD1 model vs transformers ----

@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  import diffusers
  folder = make_tiny_pipeline_folder(tmp_path_factory.mktemp("sd1"), family="sd1")
  ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, local_files_only=True)
  return ref, tinysd.load(folder)

def one_call(pipe, prompts):
  # what _encode computed before prompt syntax existed: the tokenizer's 77 ids per prompt, one encoder call for the batch
  te, tok = pipe.text_encoder, pipe.tokenizer
  return capture_jit(StableDiffusion._encoder_fn(te, False))(Tensor(np.array(tok(prompts), dtype=np.int32)).realize())[0].numpy()

def test_plain_prompt_is_bit_identical(sd1):
  _, pipe = sd1
  for prompts in (["a photo of a cat"], ["blurry", "a red lighthouse at dusk, oil painting, " + "cat " * 60]):
    got = pipe.encode_prompt(prompts).numpy()
    assert got.shape == (len(prompts), 77, 128) and np.array_equal(got, one_call(pipe, prompts))

def reference_context(ref_te, tok, text, k, clip_skip=1):
  # every chunk through transformers on its own, A1111's emphasis in float64, chunks concatenated along the sequence
  chunks = prompt.chunks(prompt.parse(text), tok)
  chunks += [([], [])] * (k - len(chunks))
  outs = []
  for ids, ws in chunks:
    ids, ws = prompt.frame(tok, ids, ws)
    with torch.no_grad():
      out = ref_te(torch.tensor([ids]), output_hidden_states=True)
      z = (out.last_hidden_state if clip_skip == 1 else ref_te.final_layer_norm(out.hidden_states[-clip_skip]))[0].double().numpy()
    zw = z * np.array(ws)[:, None]
    outs.append(zw * (z.mean() / zw.mean()))
  return np.concatenate(outs)

LONG = ("an old (red:1.3) lighthouse on a [rocky] cliff at dusk, " + "oil painting, dramatic sky, " * 11 + "(((seagulls))) BREAK "
        "in the style of an old master, \\(framed\\)")

def test_chunked_context_matches_transformers(sd1):
  ref, pipe = sd1
  assert [len(c[0]) for c in prompt.chunks(prompt.parse(LONG), pipe.tokenizer)] == [74, 4, 11]   # comma backtrack, BREAK
  got = pipe.encode_prompt(["", LONG, "a cat"]).numpy()   # padded to three chunks each, with empty ones
  assert got.shape == (3, 3 * 77, 128)
  for row, text in zip(got, ["", LONG, "a cat"]):
    np.testing.assert_allclose(row, reference_context(ref.text_encoder, pipe.tokenizer, text, 3), atol=1e-4, rtol=1e-4)
  # the padding chunks are the empty prompt's encoding, so the negative prompt "" is A1111's padded one
  np.testing.assert_array_equal(got[0, 77:154], got[0, :77])
  np.testing.assert_array_equal(got[2, 154:], got[0, :77])

def test_clip_skip(sd1):
  ref, pipe = sd1
  try:
    pipe.clip_skip = 2   # the tiny encoder has 2 layers: its embeddings after the 1st, through the final layer norm
    for text in ("a photo of a cat", LONG):
      got = pipe.encode_prompt(text).numpy()[0]
      np.testing.assert_allclose(got, reference_context(ref.text_encoder, pipe.tokenizer, text, len(got) // 77, clip_skip=2), atol=1e-4, rtol=1e-4)
    assert not np.allclose(got, pipe_encode_at(pipe, LONG, 1), atol=1e-2)
    for bad in (0, 3, 1.5):
      pipe.clip_skip = bad
      with pytest.raises(InputError, match="clip skip"): pipe.encode_prompt("a cat")
  finally: pipe.clip_skip = 1

def pipe_encode_at(pipe, text, n):
  old, pipe.clip_skip = pipe.clip_skip, n
  try: return pipe.encode_prompt(text).numpy()[0]
  finally: pipe.clip_skip = old

def test_long_prompt_txt2img(sd1):
  # > 75 tokens: the UNet cross-attends to all 154 positions (CFG batch: the short negative prompt padded to two chunks), and the words
  # after the 75th change the image (they were cut before)
  _, pipe = sd1
  x_T = np.random.default_rng(4).standard_normal((1, 4, 64 // pipe.vae_scale, 64 // pipe.vae_scale), dtype=np.float32)
  kw = dict(negative_prompt="blurry", steps=1, guidance_scale=7.5, width=64, height=64, sampler="euler", latents=x_T, output_type="np")
  head = "cat " * 75
  a, b = pipe.txt2img(head + "dog, (red:1.4) sky", **kw), pipe.txt2img(head + "cat", **kw)   # both two chunks: one UNet JIT
  assert a.shape == b.shape == (1, 64, 64, 3) and np.isfinite(a).all() and np.abs(a - b).max() > 1e-3
  assert any(k[0] == "unet" and k[3] == (2, 154, 128) for k in pipe._jits)
