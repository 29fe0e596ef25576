# Parity of tinysd's CLIP tokenizer with transformers' CLIPTokenizer (the tokenizer diffusers uses), both built from the bundled vocabulary.
import json, random, unicodedata, pytest
from tinysd.tokenizer import CLIPTokenizer

PROMPTS = [
  "a photo of an astronaut riding a horse on mars", "A Photo Of An ASTRONAUT, Riding a HoRsE",
  "masterpiece, best quality, (1girl:1.2), [cat|dog]", "wow!!! what???... ok?!", "hi!<|endoftext|>!!", "--- *** ### @@@ $$$ %%% ^^^ ~~~ `` '' \"\"",
  "1234567 3.14 -2.5e10 1,000,000 ½ ² ٣ ४", "don't, I'm, they'll, we've, you're, she'd, it's, DON'T, I'M",
  "café naïve Ångström crème brûlée façade Øresund", "cafe\u0301 A\u030angstro\u0308m", "东京 の 夜", "東京の夜景、美しい。", "서울의 밤",
  "Москва ночью", "القاهرة في الليل", "मुंबई की रात", "🔥🐱‍👤 👍🏽 🇯🇵 ❤️", "&amp; &lt; &gt; &quot; &#39; &amp;amp;",
  "a  photo\n\nof\tan \r\n astronaut   ", "  leading and trailing  ", "\u00a0nbsp\u3000ideographic\u2009thin\u200bzero-width\x85nel\x1cfs",
  "ΟΔΟΣ ΣΑΣ Σ", "'ſ 'S 'LL İstanbul K Å ﬁ", "<|endoftext|>", "a <|endoftext|> b", "!<|endoftext|>x", "<|ENDOFTEXT|> a<|startoftext|>b",
  "</w> <w> a</w>b", "", " ", "\n\t \r", "x" * 200,
  "a highly detailed matte painting of a castle on a hill at sunset, by greg rutkowski and thomas kinkade, trending on artstation, "
  "octane render, 8k, unreal engine, volumetric lighting, dramatic clouds, golden hour, cinematic composition, ultra realistic, "
  "intricate details, sharp focus, concept art, digital painting, hdr, vivid colors, 35mm, bokeh, award winning photograph",
  " ".join(f"word{i}" for i in range(120)),
]

@pytest.fixture(scope="module")
def tok(): return CLIPTokenizer()

@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
  eos, bang = tmp_path_factory.mktemp("tok_eos"), tmp_path_factory.mktemp("tok_bang")
  tok.save_folder(eos)
  CLIPTokenizer(pad_token_id=0).save_folder(bang)
  return {"eos": eos, "bang": bang}

@pytest.fixture(scope="module")
def hf(folders):
  transformers = pytest.importorskip("transformers")
  out = {k: transformers.CLIPTokenizer.from_pretrained(str(v)) for k, v in folders.items()}
  assert out["eos"].pad_token_id == 49407 and out["bang"].pad_token_id == 0
  return out

def test_bundled_vocab(tok, folders):
  vocab = json.loads((folders["eos"]/"vocab.json").read_text(encoding="utf-8"))
  merges = (folders["eos"]/"merges.txt").read_text(encoding="utf-8").splitlines()
  assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
  assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894 and merges[1] == "i n"
  # well-known CLIP ids ("a photo of a cat" = 49406 320 1125 539 320 2368 49407)
  assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0 and vocab["!</w>"] == 256
  assert [vocab[t] for t in ("a</w>", "photo</w>", "of</w>", "cat</w>")] == [320, 1125, 539, 2368]
  assert vocab["in"] == 512  # first merge comes right after the 512 byte tokens
  assert tok.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
  sp = json.loads((folders["bang"]/"special_tokens_map.json").read_text())
  assert sp["pad_token"] == "!" and json.loads((folders["eos"]/"special_tokens_map.json").read_text())["pad_token"] == "<|endoftext|>"

@pytest.mark.parametrize("text", PROMPTS)
def test_encode_decode(tok, hf, text):
  ref = hf["eos"](text).input_ids
  assert tok.encode(text) == ref
  assert tok.decode(ref) == hf["eos"].decode(ref, skip_special_tokens=True)

@pytest.mark.parametrize("pad", ["eos", "bang"])
def test_padded_batch(folders, hf, pad):
  tok = CLIPTokenizer.from_folder(folders[pad])
  assert tok.pad_token_id == hf[pad].pad_token_id and tok.max_length == 77
  ref = hf[pad](PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
  ids, dropped = tok.tokenize(PROMPTS)
  assert ids == ref and tok(PROMPTS) == ref and tok(PROMPTS[0]) == ref[:1]
  assert all(len(x) == 77 for x in ids)
  for text, row, d in zip(PROMPTS, ids, dropped):
    full = tok.encode(text)
    assert d == max(0, len(full) - 77)
    if d: assert row == full[:76] + [49407]
    else: assert row == full + [tok.pad_token_id] * (77 - len(full))
  assert sum(d > 0 for d in dropped) >= 2
  # padded rows decode to the prompt alone, whatever the pad token
  assert tok.decode(ids[0]) == tok.decode(tok.encode(PROMPTS[0])) == PROMPTS[0]

def test_fast_tokenizer(folders, hf):
  transformers = pytest.importorskip("transformers")
  if transformers.CLIPTokenizerFast is transformers.CLIPTokenizer: pytest.skip("transformers >= 5: CLIPTokenizerFast is CLIPTokenizer")
  fast = transformers.CLIPTokenizerFast.from_pretrained(str(folders["bang"]))
  assert CLIPTokenizer.from_folder(folders["bang"])(PROMPTS) == fast(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids

def test_from_folder_tokenizer_json(tmp_path, folders, hf):
  hf["bang"].save_pretrained(str(tmp_path))
  for f in ("vocab.json", "merges.txt", "special_tokens_map.json"): (tmp_path/f).unlink(missing_ok=True)
  j = json.loads((tmp_path/"tokenizer.json").read_text(encoding="utf-8"))
  ref = hf["bang"](PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
  for style in ("pairs", "strings"):  # tokenizers >= 0.20 writes [a, b] pairs, older files "a b" strings
    j["model"]["merges"] = [m if style == "pairs" else " ".join(m) for m in j["model"]["merges"]]
    (tmp_path/"tokenizer.json").write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
    tok = CLIPTokenizer.from_folder(tmp_path)
    assert isinstance(json.loads((tmp_path/"tokenizer.json").read_text())["model"]["merges"][0], list if style == "pairs" else str)
    assert tok.pad_token_id == 0 and tok(PROMPTS) == ref

def test_from_folder_legacy_config(tmp_path, tok):
  # older diffusers folders: AddedToken dicts in tokenizer_config.json, no special_tokens_map.json
  tok.save_folder(tmp_path)
  (tmp_path/"special_tokens_map.json").unlink()
  cfg = json.loads((tmp_path/"tokenizer_config.json").read_text())
  cfg["pad_token"] = {"__type": "AddedToken", "content": "!", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
  (tmp_path/"tokenizer_config.json").write_text(json.dumps(cfg))
  assert CLIPTokenizer.from_folder(tmp_path).pad_token_id == 0
  (tmp_path/"tokenizer_config.json").unlink()
  assert CLIPTokenizer.from_folder(tmp_path).pad_token_id == 49407

def test_html_unescape_option(tok):
  # transformers (hence diffusers) never html-unescapes; CLIP's original basic_clean did, twice
  clip = CLIPTokenizer(html_unescape=True)
  assert clip.encode("&amp;lt;cat&amp;gt; &quot;x&quot;") == tok.encode("<cat> \"x\"") != tok.encode("&amp;lt;cat&amp;gt; &quot;x&quot;")

def _sweep(tok, hf, cps, fmt):
  texts = [fmt.format(chr(c)) for c in cps]
  ref = hf(texts, padding=False, truncation=False).input_ids
  bad = [(hex(c), r, tok.encode(t)) for c, t, r in zip(cps, texts, ref) if tok.encode(t) != r]
  assert not bad, bad[:10]

# every code point Python's unicodedata (Unicode 14) knows; later additions differ with tokenizers' own Unicode tables (see tokenizer.py)
def _assigned(): return [c for c in range(0x110000) if not 0xd800 <= c < 0xe000 and unicodedata.category(chr(c)) != "Cn"]

def test_unicode_sample(tok, hf):
  _sweep(tok, hf["eos"], random.Random(0).sample(_assigned(), 3000), "a{0}b '{0}1 {0}Σ")

@pytest.mark.slow
def test_unicode_all(tok, hf):
  _sweep(tok, hf["eos"], _assigned(), "a{0}b '{0}1")
