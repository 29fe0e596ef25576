# The prompt language AUTOMATIC1111's webui users type: attention weights, BREAK, and prompts of any length in chunks of 75 tokens.
# Behaviour follows A1111's modules/prompt_parser.py (parse_prompt_attention) and modules/sd_hijack_clip.py (tokenize_line, the
# "Original" emphasis of sd_emphasis.py), so a prompt copied from there conditions the model the same way.
from __future__ import annotations
import re
from tinygrad import Tensor

CHUNK = 75           # prompt tokens per chunk; BOS + 75 + EOS = CLIP's 77 positions
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default: a chunk that fills up within 20 tokens of a comma is cut after the comma
UP, DOWN = 1.1, 1 / 1.1
BREAK = ("BREAK", -1.0)  # chunk separator in a parsed prompt (A1111 marks it with weight -1)

# one match per syntax element, tried in this order: escapes (a lone backslash escapes nothing and vanishes), openers, ":w)" closers,
# plain closers, text, and a ':' that does not start a weight
_TOKENS = re.compile(r"\\[()\[\]\\]?|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

def parse(text:str) -> list[tuple[str, float]]:
  """(text, weight) runs of an A1111 prompt: (x) x1.1, [x] /1.1, (x:w) xw, nesting multiplies, unclosed brackets close at the end,
  \\( \\) \\[ \\] \\\\ are literals, BREAK (a word of its own) gives the BREAK marker. Adjacent runs of equal weight are merged."""
  runs: list[list|None] = []   # [text, weight], multiplied in place as brackets close (A1111's order, so the same floats); None = BREAK
  rounds: list[int] = []       # where in runs each open '(' began; '[' in squares (the two kinds close independently, as in A1111)
  squares: list[int] = []
  def scale(start:int, m:float):
    # BREAK keeps its marker inside brackets (in A1111 "(a BREAK b)" turns it into the word "break" with weight -1.1: a bug)
    for r in runs[start:]:
      if r is not None: r[1] *= m
  for m in _TOKENS.finditer(text):
    s, w = m.group(0), m.group(1)
    if s[0] == "\\": runs.append([s[1:], 1.0])
    elif s == "(": rounds.append(len(runs))
    elif s == "[": squares.append(len(runs))
    elif w is not None and rounds and _number(w) is not None: scale(rounds.pop(), _number(w))
    elif s == ")" and rounds: scale(rounds.pop(), UP)
    elif s == "]" and squares: scale(squares.pop(), DOWN)
    else:   # text, a closer with nothing open, or an unparsable weight ("(x:1.2.3)", where A1111 raises): literal text
      for i, part in enumerate(_BREAK.split(s)):
        if i: runs.append(None)
        runs.append([part, 1.0])
  for start in rounds: scale(start, UP)
  for start in squares: scale(start, DOWN)
  out: list[tuple[str, float]] = []
  for r in runs or [["", 1.0]]:
    if r is None: out.append(BREAK)
    elif out and out[-1] != BREAK and out[-1][1] == r[1]: out[-1] = (out[-1][0] + r[0], r[1])
    else: out.append((r[0], float(r[1])))
  return out

def _number(s:str) -> float|None:
  try: return float(s)
  except ValueError: return None

def chunks(parsed:list[tuple[str, float]], tok, backtrack:int=COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
  """Token ids and per-token weights of a parsed prompt in chunks of at most CHUNK tokens (no BOS/EOS): a full chunk moves the tokens
  after its last comma to the next chunk when that comma is within `backtrack` tokens of the end; BREAK ends a chunk. Each run is
  tokenized on its own, as A1111 does. An empty prompt is one empty chunk."""
  out: list[tuple[list[int], list[float]]] = []
  ids: list[int] = []
  ws: list[float] = []
  comma, last_comma = tok.encoder.get(",</w>"), -1
  def close():
    nonlocal ids, ws, last_comma
    out.append((ids, ws))
    ids, ws, last_comma = [], [], -1
  for text, w in parsed:
    if (text, w) == BREAK:
      close()
      continue
    for t in tok.encode(text)[1:-1]:
      if t == comma: last_comma = len(ids)
      elif backtrack and len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= backtrack:
        keep = last_comma + 1
        ids, ws, rest = ids[:keep], ws[:keep], (ids[keep:], ws[keep:])
        close()
        ids, ws = rest
      if len(ids) == CHUNK: close()
      ids.append(t)
      ws.append(w)
  if ids or not out: close()
  return out

def frame(tok, ids:list[int], ws:list[float]) -> tuple[list[int], list[float]]:
  """A chunk as the text encoder sees it: BOS, the ids, EOS, the tokenizer's pad up to 77; weight 1 on all but the prompt's tokens.
  For a prompt of <= 75 tokens these are exactly the ids the tokenizer gives (transformers' padding="max_length")."""
  pad = CHUNK - len(ids)
  return [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * pad, [1.0, *ws, 1.0] + [1.0] * pad

def emphasis(z:Tensor, w:Tensor) -> Tensor:
  """A1111's "Original" emphasis on text-encoder outputs z (N, 77, D) of N chunks with token weights w (N, 77): every token vector is
  scaled by its weight, then the chunk is rescaled so its mean over tokens and channels is what it was before."""
  zw = z * w.unsqueeze(-1)
  return zw * (z.mean(axis=(1, 2), keepdim=True) / zw.mean(axis=(1, 2), keepdim=True))
