# CLIP text tower (transformers' CLIPTextModel / CLIPTextModelWithProjection layout), one class for all SD text encoders:
# OpenAI ViT-L/14 (SD1.x, SDXL #1), OpenCLIP ViT-H (SD2, 23 of 24 layers), OpenCLIP ViT-bigG (SDXL #2, with text_projection).
from __future__ import annotations
from typing import NamedTuple
from tinygrad import Tensor, nn
from tinysd.configs import CLIPConfig

class CLIPOutput(NamedTuple):
  last_hidden_state: Tensor                # after final_layer_norm
  penultimate_hidden_state: Tensor         # output of layer N-1, before final_layer_norm (transformers' hidden_states[-2])
  pooled: Tensor                           # last_hidden_state at the EOS token
  text_embeds: Tensor|None = None          # pooled @ text_projection.T, only with cfg.projection_dim

class LayerNorm(nn.LayerNorm):
  # statistics in fp32 even for fp16 weights (mean/var over 768-1280 channels), result back in the input dtype
  def __call__(self, x:Tensor) -> Tensor: return super().__call__(x.float()).cast(x.dtype)

class CLIPAttention:
  def __init__(self, cfg:CLIPConfig):
    self.heads, d = cfg.num_attention_heads, cfg.hidden_size
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = [nn.Linear(d, d) for _ in range(4)]
  def __call__(self, x:Tensor) -> Tensor:
    (B, T, D), H = x.shape, self.heads
    q, k, v = [p(x).reshape(B, T, H, D//H).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)]
    # tinygrad's SDPA runs softmax in q's dtype; at 77 tokens attention is cheap, so upcast to keep softmax in fp32 for fp16 weights
    o = q.float().scaled_dot_product_attention(k.float(), v.float(), is_causal=True).cast(x.dtype)
    return self.out_proj(o.transpose(1, 2).reshape(B, T, D))

class CLIPMLP:
  def __init__(self, cfg:CLIPConfig):
    self.fc1, self.fc2 = nn.Linear(cfg.hidden_size, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, cfg.hidden_size)
    # "gelu" in transformers is the exact erf form, not the tanh approximation
    self.act = {"quick_gelu": Tensor.quick_gelu, "gelu": lambda x: x.gelu(approximate="none")}[cfg.hidden_act]
  def __call__(self, x:Tensor) -> Tensor: return self.fc2(self.act(self.fc1(x)))

class CLIPEncoderLayer:
  def __init__(self, cfg:CLIPConfig):
    self.self_attn, self.mlp = CLIPAttention(cfg), CLIPMLP(cfg)
    self.layer_norm1, self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps), LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
  def __call__(self, x:Tensor) -> Tensor:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))

class CLIPTextEmbeddings:
  def __init__(self, cfg:CLIPConfig):
    self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
  # positions are always 0..T-1, so slice the table instead of a lookup (checkpoints' position_ids buffer is not needed)
  def __call__(self, ids:Tensor) -> Tensor: return self.token_embedding(ids) + self.position_embedding.weight[:ids.shape[-1]]

class CLIPEncoder:
  def __init__(self, cfg:CLIPConfig): self.layers = [CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]

class CLIPTextTransformer:
  def __init__(self, cfg:CLIPConfig):
    self.embeddings, self.encoder = CLIPTextEmbeddings(cfg), CLIPEncoder(cfg)
    self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

class CLIPTextModel:
  def __init__(self, cfg:CLIPConfig):
    self.cfg, self.text_model = cfg, CLIPTextTransformer(cfg)
    self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False) if cfg.projection_dim is not None else None

  def __call__(self, input_ids:Tensor) -> CLIPOutput:
    tm = self.text_model
    x = prev = tm.embeddings(input_ids)
    for layer in tm.encoder.layers: prev, x = x, layer(x)
    last = tm.final_layer_norm(x)
    # transformers' rule: legacy configs (eos_token_id == 2) take argmax(ids), as EOS 49407 is the largest id; else the first EOS
    eos = input_ids.argmax(-1) if self.cfg.eos_token_id == 2 else (input_ids == self.cfg.eos_token_id).int().argmax(-1)
    pooled = (Tensor.arange(input_ids.shape[-1]) == eos.unsqueeze(-1)).unsqueeze(-1).where(last, 0).sum(1, dtype=last.dtype)
    return CLIPOutput(last, prev, pooled, self.text_projection(pooled) if self.text_projection is not None else None)

  def hidden_state(self, input_ids:Tensor, n:int) -> Tensor:
    """transformers' hidden_states[-n]: the output of layer num_hidden_layers+1-n, before final_layer_norm (n = num_hidden_layers+1: the
    embeddings). Shares its graph with __call__'s on the same ids, so asking for both runs the tower once."""
    layers = self.text_model.encoder.layers
    x = self.text_model.embeddings(input_ids)
    for layer in layers[:len(layers) + 1 - n]: x = layer(x)
    return x
