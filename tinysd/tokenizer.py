# CLIP byte-level BPE tokenizer (OpenAI CLIP simple_tokenizer), ids identical to transformers' CLIPTokenizer, the tokenizer diffusers uses.
# Text clean-up follows transformers, not CLIP's original basic_clean: NFC, whitespace runs -> " ", lower-case; no ftfy and no html unescape
# (html_unescape=True gives CLIP's double html.unescape back). Special tokens are split off the raw text before any clean-up, as the
# tokenizers library does, so "<|ENDOFTEXT|>" or "!<|endoftext|>" tokenize the way transformers tokenizes them (and so does "!" with
# SD2's pad token "!", see _build). Every code point of Unicode 14 (Python 3.11's tables) tokenizes as in transformers; characters encoded
# later can differ, since the regex module, Python's str.lower and tokenizers' Rust code each carry a different Unicode version.
import functools, gzip, html, json, os, pathlib, unicodedata
import regex

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_GZ = pathlib.Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
_WS = regex.compile(r"\s+")
# CLIP's split regex minus its special-token alternatives (they are split off first) and minus re.IGNORECASE: text is already lower-case,
# and transformers matches case-sensitively ("'ſ" is not the contraction "'s" there)
_PAT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")

@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  # GPT-2's reversible byte -> printable char map: printable latin-1 bytes map to themselves, the other 68 to chr(256+n)
  bs = list(range(ord("!"), ord("~")+1)) + list(range(ord("¡"), ord("¬")+1)) + list(range(ord("®"), ord("ÿ")+1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs: bs.append(b); cs.append(256+n); n += 1
  return dict(zip(bs, map(chr, cs)))

def _clip_vocab(path) -> tuple[dict[str, int], list[tuple[str, str]]]:
  # standard CLIP construction: 256 byte chars, their "</w>" versions, one token per merge, then BOS/EOS (= 49406, 49407)
  with (gzip.open(path) if str(path).endswith(".gz") else open(path, "rb")) as f: raw = f.read().decode("utf-8")
  merges = [tuple(l.split()) for l in raw.split("\n")[1:49152-256-2+1]]
  toks = list(bytes_to_unicode().values())
  toks += [t+"</w>" for t in toks] + ["".join(m) for m in merges] + [BOS, EOS]
  return {t: i for i, t in enumerate(toks)}, merges

def _token_str(v) -> str|None: return v.get("content") if isinstance(v, dict) else v

class TokenizerError(ValueError): pass

def _read_json(p:pathlib.Path):
  try: return json.loads(p.read_bytes())
  except (OSError, ValueError, RecursionError) as e: raise TokenizerError(f"{p}: cannot read tokenizer file ({type(e).__name__})") from None

def _checked(p:pathlib.Path, vocab, merges, cfg:dict) -> tuple[dict[str, int], list[tuple[str, str]], str, str, int]:
  # the folder is the user's: every shape transformers' loader would trip over becomes one TokenizerError naming it
  if not isinstance(vocab, dict) or not vocab or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31
                                                          for k, v in vocab.items()):
    raise TokenizerError(f"{p}: the vocabulary must map token strings to ids >= 0")
  if not isinstance(merges, list) or not all(isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in merges):
    raise TokenizerError(f"{p}: merges must be pairs of token strings")
  tok = {k: _token_str(cfg.get(k)) for k in ("pad_token", "unk_token")}
  if not all(t is None or isinstance(t, str) for t in tok.values()): raise TokenizerError(f"{p}: special tokens must be strings")
  pad, unk = tok["pad_token"] or EOS, tok["unk_token"] or EOS
  for name, t in (("BOS", BOS), ("EOS", EOS), ("pad token", pad)):
    if t not in vocab: raise TokenizerError(f"{p}: {name} {t!r} is not in the vocabulary")
  max_length = cfg.get("model_max_length", 77)
  if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length > 4096: max_length = 77  # unset in some folders: transformers' VERY_LARGE_INTEGER
  if max_length < 2: raise TokenizerError(f"{p}: model_max_length {max_length} leaves no room for BOS and EOS")
  return vocab, [tuple(m) for m in merges], pad, unk, max_length

class CLIPTokenizer:
  def __init__(self, vocab_file=None, pad_token_id=49407, max_length=77, *, html_unescape=False):
    self._build(*_clip_vocab(VOCAB_GZ if vocab_file is None else vocab_file), pad_token_id, max_length, html_unescape)

  def _build(self, vocab:dict[str, int], merges:list[tuple[str, str]], pad_token_id:int, max_length:int, html_unescape:bool=False, unk:str=EOS):
    self.encoder, self.merges = vocab, merges
    self.decoder = {i: t for t, i in vocab.items()}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    if pad_token_id not in self.decoder: raise TokenizerError(f"pad token id {pad_token_id} is not in the vocabulary")
    self.bos_token_id, self.eos_token_id = vocab[BOS], vocab[EOS]
    self.unk_token_id = vocab.get(unk, self.eos_token_id)   # transformers maps a BPE piece missing from the vocabulary to unk
    self.pad_token_id, self.max_length, self.html_unescape = pad_token_id, max_length, html_unescape
    self.cache: dict[str, list[int]] = {}
    # transformers registers BOS, EOS and the pad token as special tokens and splits them off the raw text before anything else; with
    # SD2's pad "!" that makes every "!" its own token (id 0, no "</w>"), unlike CLIP's original tokenizer. Longest first = leftmost-longest.
    specials = sorted({BOS, EOS, self.decoder[pad_token_id]}, key=len, reverse=True)
    self._special = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")")

  @classmethod
  def from_folder(cls, path, *, html_unescape=False) -> "CLIPTokenizer":
    p = pathlib.Path(path)
    if (p/"vocab.json").is_file() and (p/"merges.txt").is_file():
      vocab = _read_json(p/"vocab.json")
      try: text = (p/"merges.txt").read_text(encoding="utf-8")
      except (OSError, ValueError) as e: raise TokenizerError(f"{p/'merges.txt'}: cannot read tokenizer file ({type(e).__name__})") from None
      merges = [l.split() for l in text.split("\n") if l.strip() and not l.startswith("#version")]
    elif (p/"tokenizer.json").is_file():
      model = _read_json(p/"tokenizer.json")
      model = model.get("model") if isinstance(model, dict) else None
      if not isinstance(model, dict) or not isinstance(model.get("merges"), list): raise TokenizerError(f"{p/'tokenizer.json'}: not a BPE tokenizer")
      vocab = model.get("vocab")
      merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    else: raise TokenizerError(f"{p}: no tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    cfg = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # special_tokens_map overrides, as in transformers
      if (p/name).is_file():
        if not isinstance(d := _read_json(p/name), dict): raise TokenizerError(f"{p/name}: not a JSON object")
        cfg.update({k: v for k, v in d.items() if v is not None})
    vocab, merges, pad, unk, max_length = _checked(p, vocab, merges, cfg)
    tok = cls.__new__(cls)
    tok._build(vocab, merges, vocab[pad], max_length, html_unescape, unk)
    return tok

  def _bpe(self, word:str) -> list[int]:
    if (ids := self.cache.get(word)) is not None: return ids
    parts = [self.byte_encoder[b] for b in word.encode("utf-8")]
    parts[-1] += "</w>"
    while len(parts) > 1:
      pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, 1 << 62))
      if pair not in self.ranks: break
      i, merged = 0, []
      while i < len(parts):  # merge every occurrence of the best pair, left to right
        if i < len(parts)-1 and (parts[i], parts[i+1]) == pair: merged.append(parts[i]+parts[i+1]); i += 2
        else: merged.append(parts[i]); i += 1
      parts = merged
    ids = [self.encoder.get(p, self.unk_token_id) for p in parts]
    if len(self.cache) > 100_000: self.cache.clear()
    self.cache[word] = ids
    return ids

  def encode(self, text:str) -> list[int]:
    try: text.encode("utf-8")
    except UnicodeEncodeError as e:   # lone surrogates: what Python makes of invalid UTF-8 bytes in argv
      raise TokenizerError(f"prompt is not valid UTF-8 text (undecodable byte at character {e.start})") from None
    if self.html_unescape: text = html.unescape(html.unescape(text))
    ids = [self.bos_token_id]
    for i, part in enumerate(self._special.split(text)):
      if i % 2: ids.append(self.encoder[part]); continue
      # lower-case char by char like the tokenizers library: no final-sigma rule, so "Σ" always becomes "σ"
      part = _WS.sub(" ", unicodedata.normalize("NFC", part)).replace("Σ", "σ").lower()
      for word in _PAT.findall(part): ids.extend(self._bpe(word))
    return ids + [self.eos_token_id]

  def tokenize(self, texts:str|list[str]) -> tuple[list[list[int]], list[int]]:
    out, dropped = [], []
    for text in [texts] if isinstance(texts, str) else texts:
      ids = self.encode(text)
      dropped.append(max(0, len(ids) - self.max_length))
      if len(ids) > self.max_length: ids = ids[:self.max_length-1] + [self.eos_token_id]
      out.append(ids + [self.pad_token_id] * (self.max_length - len(ids)))
    return out, dropped

  def __call__(self, texts:str|list[str]) -> list[list[int]]: return self.tokenize(texts)[0]

  def decode(self, ids) -> str:
    # like transformers' decode(skip_special_tokens=True), and anything after the last EOS is padding; "</w>" ends a word
    ids = [int(i) for i in ids]
    if self.eos_token_id in ids: ids = ids[:len(ids)-ids[::-1].index(self.eos_token_id)]
    ids = [i for i in ids if i not in (self.bos_token_id, self.eos_token_id)]
    text = bytes(self.byte_decoder[c] for c in "".join(self.decoder[i] for i in ids)).decode("utf-8", errors="replace")
    return text.replace("</w>", " ").strip()

  def save_folder(self, path):
    p = pathlib.Path(path)
    os.makedirs(p, exist_ok=True)
    (p/"vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
    (p/"merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.decoder[self.pad_token_id]}
    (p/"special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "do_lower_case": True, "errors": "replace", **special}
    (p/"tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
