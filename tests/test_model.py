"""Model: parity with transformers, KV-cache decoding, HF load/save, bad directories.

Tiny checkpoints are written by `make_tiny_model_dir`, i.e. by our `save_model`; the
parity tests load those same directories in transformers, so they also show that a
directory saved by us loads in transformers with equal logits.
"""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cispo_jax.model import forward, init_cache, init_params, logical_axes, positions_from_mask
from cispo_jax.model.hf_io import load_config, load_model, load_params, load_tokenizer, save_model
from cispo_jax.model.tiny import (SIMPLE_CHAT_TEMPLATE, build_char_tokenizer, make_tiny_model_dir, random_params,
                                  tiny_config)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # small so the 16-dim head has low, medium and high frequency bands
               "original_max_position_embeddings": 16}
VARIANTS = {
    "llama": dict(family="llama"),
    "llama3_rope_bias": dict(family="llama", rope_scaling=LLAMA3_ROPE, qkv_bias=True, o_bias=True),
    "llama_linear_rope": dict(family="llama", rope_scaling={"rope_type": "linear", "factor": 2.0},
                              num_kv_heads=4, rope_theta=500.0),
    "qwen2_tied": dict(family="qwen2", tie_word_embeddings=True),
    "qwen3_headdim": dict(family="qwen3", head_dim=32, num_kv_heads=1),
}
TEXTS = ["hello world 1+2=3", "ab", "The quick brown fox jumps", "x"]

fwd = jax.jit(forward, static_argnums=(1,))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  return {name: make_tiny_model_dir(str(root / name), seed=i, **kw)
          for i, (name, kw) in enumerate(VARIANTS.items())}


def _batch(tok, texts=TEXTS):
  enc = tok(texts, padding=True, padding_side="left", return_tensors="np")
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def _torch_logits(model_dir, ids, mask):
  torch = pytest.importorskip("torch", reason="torch (test-only dependency) is needed for parity tests")
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(
      model_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True)
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)  # what HF generate passes for left padding
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos, dtype=torch.long))
  return out.logits.float().numpy()


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(dirs, name):
  """Our logits == transformers' (torch f32, eager) on a left-padded batch; the directory
  was written by our save_model, so this is also the 'saved dir loads in transformers' test."""
  cfg, params = load_model(dirs[name])
  ids, mask = _batch(load_tokenizer(dirs[name]))
  assert (mask == 0).any()  # left padding is actually exercised
  ref = _torch_logits(dirs[name], ids, mask)
  ours = np.asarray(fwd(params, cfg, jnp.asarray(ids), None, jnp.asarray(mask))[0])
  real = mask.astype(bool)
  diff = np.abs(ours - ref)[real].max()
  print(f"parity {name}: max|diff|={diff:.2e} max|logit|={np.abs(ref[real]).max():.2f}")
  assert np.abs(ref[real]).max() > 1.0  # logits are not trivially small
  assert diff <= 1e-4


def test_loads_checkpoint_saved_by_transformers(tmp_path):
  """A checkpoint written by transformers itself (its config.json format, sharded with an
  index, rope_parameters) loads in ours with equal logits."""
  torch = pytest.importorskip("torch", reason="torch (test-only dependency) is needed for parity tests")
  import transformers

  torch.manual_seed(0)
  hf_cfg = transformers.Qwen3Config(
      vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}, attention_bias=True,
      initializer_range=0.3)
  model = transformers.Qwen3ForCausalLM(hf_cfg).float().eval()
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  cfg, params = load_model(str(tmp_path))
  assert cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0} and cfg.o_bias and cfg.qk_norm
  ids = np.random.default_rng(0).integers(0, 40, (2, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  ref = _torch_logits(str(tmp_path), ids, mask)
  ours = np.asarray(fwd(params, cfg, jnp.asarray(ids), None, jnp.asarray(mask))[0])
  assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4


# ----------------------------------------------------------------------------- KV cache


def _decode_incrementally(cfg, params, ids, mask, prompt_len, cache_len):
  """Prefill `prompt_len` tokens, then feed the rest one at a time through the cache."""
  B, T = ids.shape
  cache = init_cache(cfg, B, cache_len)
  kv_valid = np.zeros((B, cache_len), bool)
  kv_valid[:, :T] = mask.astype(bool)
  pos = np.asarray(positions_from_mask(mask))
  logits, cache = fwd(params, cfg, ids[:, :prompt_len], pos[:, :prompt_len], kv_valid, cache, 0)
  steps = [logits]
  for t in range(prompt_len, T):
    logits, cache = fwd(params, cfg, ids[:, t:t + 1], pos[:, t:t + 1], kv_valid, cache, t)
    steps.append(logits)
  return np.concatenate([np.asarray(s) for s in steps], axis=1)


@pytest.mark.parametrize("name", ["llama3_rope_bias", "qwen2_tied", "qwen3_headdim"])
def test_kv_cache_decoding_matches_full_forward(dirs, name):
  cfg, params = load_model(dirs[name])
  ids, mask = _batch(load_tokenizer(dirs[name]))
  full = np.asarray(fwd(params, cfg, jnp.asarray(ids), None, jnp.asarray(mask))[0])
  # cache longer than the sequence: the unused tail slots must not leak in.
  inc = _decode_incrementally(cfg, params, ids, mask, prompt_len=5, cache_len=ids.shape[1] + 6)
  real = mask.astype(bool)
  assert np.abs(inc - full)[real].max() <= 1e-5


def test_kv_cache_wrong_call_is_refused(dirs):
  cfg, params = load_model(dirs["llama"])
  with pytest.raises(ValueError, match="kv_valid_BxS"):
    forward(params, cfg, jnp.zeros((1, 1), jnp.int32), cache=init_cache(cfg, 1, 4))


# ----------------------------------------------------------------------------- remat, axes, dtypes


def test_remat_gives_same_logits_and_grads(dirs):
  cfg, params = load_model(dirs["qwen3_headdim"])
  ids, mask = _batch(load_tokenizer(dirs["qwen3_headdim"]))

  def loss(p, c):
    logits, _ = forward(p, c, jnp.asarray(ids), None, jnp.asarray(mask))
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -(jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], -1)[..., 0] * mask[:, 1:]).sum()

  grad_fn = jax.value_and_grad(loss)
  jaxprs = {r: str(jax.make_jaxpr(grad_fn, static_argnums=1)(params, cfg.replace(remat=r))) for r in (0, 1)}
  # The flag really rematerialises: it adds a per-layer remat (the SwiGLU always has its own, which
  # keeps only its two matmul outputs; see transformer._SWIGLU_SAVES).
  assert jaxprs[1].count("remat") > jaxprs[0].count("remat")
  outs = {r: jax.jit(grad_fn, static_argnums=1)(params, cfg.replace(remat=r)) for r in (False, True)}
  np.testing.assert_allclose(outs[True][0], outs[False][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(outs[True][1]), jax.tree.leaves(outs[False][1])):
    # recomputation may fuse differently: f32 rounding only
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_mlp_weight_gradients_need_no_transposed_copies():
  """Weight matmuls run over one merged token dim (transformer._tokens_matmul): with [B, T] kept as
  two contracting dims of the weight gradient, XLA materialised transposed [F, B, T] copies of the
  MLP cotangents (19-26% of the update's op time on CPU, benchmarks/bench_update.py)."""
  cfg = tiny_config("qwen2", vocab_size=50, hidden_size=64, intermediate_size=96, num_layers=2)
  B, T, F = 4, 12, 96
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (B, T)), jnp.int32)
  hlo = jax.jit(jax.grad(lambda p: forward(p, cfg, ids)[0].sum())).lower(random_params(cfg)).compile().as_text()
  shapes = re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} (?:fusion|copy|transpose)\(", hlo)
  assert shapes and not [s for s in shapes if s in (f"{F},{B * T}", f"{F},{B},{T}")]


def test_logical_axes_cover_every_param(dirs):
  cfg, params = load_model(dirs["llama3_rope_bias"])
  axes = logical_axes(cfg)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) == \
      jax.tree.structure(params)
  flat = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for spec, p in zip(flat, jax.tree.leaves(params)):
    assert len(spec) == p.ndim
  assert set(a for s in flat for a in s) <= {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm",
                                             "layers"}
  # Layer parameters are stacked (one scan over layers): their leading axis is `layers`, of size L.
  for spec, p in zip(jax.tree.leaves(axes["layers"], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                     jax.tree.leaves(params["layers"])):
    assert spec[0] == "layers" and p.shape[0] == cfg.num_layers and "layers" not in spec[1:]


def test_bf16_params_load_and_run(dirs, tmp_path):
  cfg32, p32 = load_model(dirs["qwen2_tied"])
  cfg16, p16 = load_model(dirs["qwen2_tied"], param_dtype="bfloat16", dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
  ids, mask = _batch(load_tokenizer(dirs["qwen2_tied"]))
  l32 = np.asarray(fwd(p32, cfg32, jnp.asarray(ids), None, jnp.asarray(mask))[0])
  l16 = np.asarray(fwd(p16, cfg16, jnp.asarray(ids), None, jnp.asarray(mask))[0])
  assert l16.dtype == np.float32 and np.isfinite(l16).all()
  assert np.abs(l16 - l32)[mask.astype(bool)].max() < 0.1 * np.abs(l32).max()
  # A bf16 checkpoint on disk stays bf16 and loads bit-exactly (also upcast to f32).
  save_model(str(tmp_path), cfg16, p16)
  assert next(iter(load_file(str(tmp_path / "model.safetensors")).values())).dtype.name == "bfloat16"
  again = load_params(str(tmp_path), cfg16)
  up = load_params(str(tmp_path), cfg32)
  for a, b, c in zip(jax.tree.leaves(p16), jax.tree.leaves(again), jax.tree.leaves(up)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(a).astype(np.float32), np.asarray(c))


# Abridged config.json files of real checkpoints (as published on the HF hub).
REAL_CONFIGS = {
    "Qwen2.5-0.5B-Instruct": dict(
        architectures=["Qwen2ForCausalLM"], hidden_act="silu", hidden_size=896, intermediate_size=4864,
        max_position_embeddings=32768, max_window_layers=21, num_attention_heads=14, num_hidden_layers=24,
        num_key_value_heads=2, rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=32768,
        tie_word_embeddings=True, torch_dtype="bfloat16", use_sliding_window=False, vocab_size=151936),
    "Llama-3.2-1B": dict(
        architectures=["LlamaForCausalLM"], attention_bias=False, head_dim=64, hidden_act="silu",
        hidden_size=2048, intermediate_size=8192, max_position_embeddings=131072, mlp_bias=False,
        num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8, rms_norm_eps=1e-05,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        rope_theta=500000.0, tie_word_embeddings=True, vocab_size=128256),
    "Qwen3-0.6B": dict(
        architectures=["Qwen3ForCausalLM"], attention_bias=False, head_dim=128, hidden_act="silu",
        hidden_size=1024, intermediate_size=3072, max_position_embeddings=40960, max_window_layers=28,
        num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-06,
        rope_scaling=None, rope_theta=1000000, sliding_window=None, tie_word_embeddings=True,
        use_sliding_window=False, vocab_size=151936),
}


def test_real_checkpoint_configs_parse():
  from cispo_jax.model.hf_io import config_from_hf_dict
  from cispo_jax.model.transformer import param_shapes

  n_params = {}
  for name, raw in REAL_CONFIGS.items():
    cfg = config_from_hf_dict(raw, name, param_dtype="bfloat16")
    n_params[name] = sum(np.prod(x.shape) for x in jax.tree.leaves(param_shapes(cfg)))
    assert cfg.tie_word_embeddings and cfg.param_dtype == "bfloat16"
  q2, l3, q3 = (config_from_hf_dict(r) for r in REAL_CONFIGS.values())
  assert (q2.qkv_bias, q2.o_bias, q2.qk_norm, q2.head_dim) == (True, False, False, 64)
  assert (l3.qkv_bias, l3.qk_norm, l3.rope_scaling_dict["rope_type"], l3.rope_theta) == (False, False, "llama3", 5e5)
  assert (q3.qk_norm, q3.head_dim, q3.num_heads * q3.head_dim, q3.rope_scaling) == (True, 128, 2048, None)
  # Published parameter counts: 0.49B, 1.24B, 0.6B (0.44B without embeddings).
  assert n_params["Qwen2.5-0.5B-Instruct"] == 494_032_768
  assert n_params["Llama-3.2-1B"] == 1_235_814_400
  assert n_params["Qwen3-0.6B"] == 596_049_920


def test_load_params_places_each_tensor_with_its_sharding(dirs):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  cfg, params = load_model(dirs["qwen2_tied"])
  mesh = Mesh(np.array(jax.devices()), ("d",))
  shardings = jax.tree.map(
      lambda x: NamedSharding(mesh, P("d") if x.shape[0] % len(jax.devices()) == 0 else P()), params)
  sharded = load_params(dirs["qwen2_tied"], cfg, shardings=shardings)
  for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
    assert b.sharding == s and np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_save_load_round_trip_is_bit_identical(dirs, tmp_path, shard_bytes):
  cfg, params = load_model(dirs["llama3_rope_bias"])
  tok = load_tokenizer(dirs["llama3_rope_bias"])
  save_model(str(tmp_path), cfg, params, tokenizer=tok, max_shard_bytes=shard_bytes)
  shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert (len(shards) > 1) == (shard_bytes is not None)
  assert os.path.exists(tmp_path / "model.safetensors.index.json") == (shard_bytes is not None)
  cfg2, params2 = load_model(str(tmp_path))
  assert cfg2 == cfg
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  assert load_tokenizer(str(tmp_path))("ab 12")["input_ids"] == tok("ab 12")["input_ids"]


def test_init_params_save_load_round_trip(tmp_path):
  from cispo_jax.model.tiny import tiny_config

  cfg = tiny_config("qwen3", vocab_size=50, tie_word_embeddings=True)
  params = init_params(cfg, jax.random.PRNGKey(3))
  save_model(str(tmp_path), cfg, params)
  cfg2, params2 = load_model(str(tmp_path))
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- bad directories


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _edit_config(d, **kw):
  path = os.path.join(d, "config.json")
  raw = json.load(open(path))
  raw.update(kw)
  json.dump(raw, open(path, "w"))


def test_bad_directories_give_clear_errors(dirs, tmp_path):
  src = dirs["llama3_rope_bias"]
  with pytest.raises(FileNotFoundError, match="not a directory"):
    load_model(str(tmp_path / "nope"))

  d = _copy(src, tmp_path / "no_config")
  os.remove(os.path.join(d, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_model(d)

  d = _copy(src, tmp_path / "gpt2")
  _edit_config(d, architectures=["GPT2LMHeadModel"])
  with pytest.raises(ValueError, match="GPT2LMHeadModel.*allowed.*LlamaForCausalLM"):
    load_model(d)

  d = _copy(src, tmp_path / "no_weights")
  os.remove(os.path.join(d, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    load_model(d)

  # Pickle only: refused before anything reads the file (its content is not even a pickle).
  open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"not a pickle")
  with pytest.raises(ValueError, match="pickle weights are refused.*safetensors"):
    load_model(d)

  d = _copy(src, tmp_path / "shape")
  _edit_config(d, intermediate_size=96)
  with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.*shape \((128, 64|64, 128)\).*expected"):
    load_model(d)

  d = _copy(src, tmp_path / "missing")
  tensors = load_file(os.path.join(d, "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match="missing tensor.*model.layers.1.mlp.up_proj.weight"):
    load_model(d)

  d = _copy(src, tmp_path / "unexpected")
  _edit_config(d, attention_bias=False)  # the file still holds the bias tensors
  with pytest.raises(ValueError, match="unexpected tensor.*bias"):
    load_model(d)

  d = _copy(src, tmp_path / "shard_missing")
  json.dump({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}},
            open(os.path.join(d, "model.safetensors.index.json"), "w"))
  with pytest.raises(FileNotFoundError, match="missing"):
    load_model(d)


@pytest.mark.parametrize("edit,match", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn.*allowed: default, linear, llama3"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "dynamic.*not supported"),
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), "sliding-window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding-window"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_configs_are_refused(dirs, tmp_path, edit, match):
  d = _copy(dirs["qwen2_tied"], tmp_path / "d")
  _edit_config(d, **edit)
  with pytest.raises(ValueError, match=match):
    load_config(d)


def test_unknown_run_override_is_refused(dirs):
  with pytest.raises(ValueError, match="allowed.*param_dtype"):
    load_config(dirs["llama"], param_dtype="bfloat16", flash=True)
  with pytest.raises(ValueError, match="dtype.*allowed"):
    load_config(dirs["llama"], dtype="int8")


# ----------------------------------------------------------------------------- tokenizer


def test_char_tokenizer_round_trips_and_saves(tmp_path):
  tok = build_char_tokenizer("ab c\n12+=", chat_template=SIMPLE_CHAT_TEMPLATE)
  assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, None)
  for s in ["ab c\n1+2=12", "  a  ", "\n\n", ""]:
    ids = tok(s)["input_ids"]
    assert len(ids) == len(s) and tok.decode(ids) == s
  assert tok.decode(tok("ab")["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == "ab"
  tok.save_pretrained(tmp_path)
  again = load_tokenizer(str(tmp_path))
  assert again("ab c")["input_ids"] == tok("ab c")["input_ids"] and again.decode([3, 4]) == "ab"
  assert again.chat_template == tok.chat_template
  with pytest.raises(ValueError, match="distinct"):
    build_char_tokenizer("aa")


def test_last_n_logits_equal_the_tail_of_the_full_forward():
  from cispo_jax.model import ModelConfig, forward, init_params

  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=8)
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 7), 0, 32)
  mask = jnp.arange(7)[None, :] >= jnp.array([[0], [2], [3]])  # left padding
  full, _ = forward(params, cfg, tokens, kv_valid_BxS=mask)
  tail, _ = forward(params, cfg, tokens, kv_valid_BxS=mask, last_n=3)
  assert tail.shape == (3, 3, 32)
  np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, -3:]), rtol=1e-6, atol=1e-6)
