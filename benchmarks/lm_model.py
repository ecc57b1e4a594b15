"""A small decoder-only (GPT-style) byte-level transformer written in Flax NNX.

Pre-LayerNorm blocks, causal multi-head self-attention, a GELU MLP, learned positional
embeddings and an output head tied to the token embedding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer hyper-parameters."""

  vocab_size: int = 256
  seq_len: int = 64
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4


def _dense(d_in: int, d_out: int, stddev: float, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, kernel_init=nnx.initializers.normal(stddev), rngs=rngs)


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention with a causal mask (fused QKV projection)."""

  def __init__(self, config: ModelConfig, out_stddev: float, *, rngs: nnx.Rngs):
    if config.d_model % config.num_heads:
      raise ValueError("d_model must be divisible by num_heads.")
    self.num_heads = config.num_heads
    self.qkv = _dense(config.d_model, 3 * config.d_model, 0.02, rngs)
    self.out = _dense(config.d_model, config.d_model, out_stddev, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    q, k, v = (t.reshape(batch, length, self.num_heads, head_dim) for t in (q, k, v))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(batch, length, width))


class Block(nnx.Module):
  """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    out_stddev = 0.02 / math.sqrt(2 * config.num_layers)
    hidden = config.mlp_ratio * config.d_model
    self.ln1 = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.attn = CausalSelfAttention(config, out_stddev, rngs=rngs)
    self.ln2 = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.fc_in = _dense(config.d_model, hidden, 0.02, rngs)
    self.fc_out = _dense(hidden, config.d_model, out_stddev, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.fc_out(jax.nn.gelu(self.fc_in(self.ln2(x))))


class TransformerLM(nnx.Module):
  """Decoder-only language model mapping int tokens ``[B, T]`` to logits ``[B, T, V]``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.config = config
    self.token_embed = nnx.Embed(config.vocab_size, config.d_model, embedding_init=init, rngs=rngs)
    self.pos_embed = nnx.Embed(config.seq_len, config.d_model, embedding_init=init, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.ln_f = nnx.LayerNorm(config.d_model, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.token_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))[None]
    for block in self.blocks:
      x = block(x)
    return self.token_embed.attend(self.ln_f(x))


def lm_loss(model: TransformerLM, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy in nats."""
  logits = model(inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def count_params(model: nnx.Module) -> int:
  """Number of trainable scalars."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
