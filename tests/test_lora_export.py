"""LoRA exports (model/hf_io/peft.py): our adapter directories load in transformers + peft with our logits, the
merged export loads in plain transformers with them too, save_peft -> load_peft is exact, what our model cannot
run is refused by name, and `python -m cispo_jax.evaluate` takes an adapter directory (on its recorded base, a
different base refused)."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cispo_jax import evaluate
from cispo_jax.model import forward, hf_io, lora, param_shapes
from cispo_jax.model.tiny import build_char_tokenizer, make_tiny_model_dir

from test_chat_template import CHATML
from test_evaluate import GSM

torch = pytest.importorskip("torch", reason="torch (test-only dependency) is needed for parity tests")
peft = pytest.importorskip("peft", reason="peft (test-only dependency) loads our adapters in transformers")

fwd = jax.jit(forward, static_argnums=(1,))
TOKENS = np.random.default_rng(0).integers(3, 60, size=(2, 9)).astype(np.int32)
CASES = {  # name -> (tie_word_embeddings, LoraConfig)
    "tied_layers": (True, lora.LoraConfig(rank=4, alpha=8.0)),
    "untied_all": (False, lora.LoraConfig(rank=4, alpha=8.0, targets=lora.TARGETS)),
    "untied_all_rslora": (False, lora.LoraConfig(rank=4, alpha=6.0, targets=lora.TARGETS, rslora=True)),
}


def _nonzero_adapters(cfg, lcfg, seed=0, scale=0.1):
  """lora.init_adapters plus noise on every leaf (B is zero and the embedding's A too at init)."""
  adapters = lora.init_adapters(jax.random.PRNGKey(seed), param_shapes(cfg), lcfg)
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _hf_logits(model):
  with torch.no_grad():
    return model(input_ids=torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _base_model(path):
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                           local_files_only=True)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
  """A tiny two-layer Qwen2 (qkv bias), random non-zero adapters on it saved by save_peft, and our logits."""
  tied, lcfg = CASES[request.param]
  root = tmp_path_factory.mktemp(request.param)
  tok = build_char_tokenizer()
  base_dir = make_tiny_model_dir(str(root / "base"), "qwen2", tokenizer=tok, hidden_size=32, num_layers=2,
                                 num_heads=4, num_kv_heads=2, tie_word_embeddings=tied, seed=3)
  cfg, base = hf_io.load_model(base_dir)
  adapters = _nonzero_adapters(cfg, lcfg)
  adapter_dir = hf_io.save_peft(str(root / "adapter"), cfg, adapters, lcfg, base_dir, base_fingerprint="0" * 16)
  run_cfg = cfg.replace(lora_scaling=lcfg.scaling)
  ours = np.asarray(fwd(lora.combine(base, adapters), run_cfg, jnp.asarray(TOKENS))[0])
  plain = np.asarray(fwd(base, cfg, jnp.asarray(TOKENS))[0])
  assert np.abs(ours - plain).max() > 0.1  # the adapters change the logits: the comparisons below mean something
  return dict(root=root, tok=tok, base_dir=base_dir, cfg=cfg, base=base, adapters=adapters, lcfg=lcfg,
              adapter_dir=adapter_dir, ours=ours)


def test_adapters_load_in_transformers_peft_with_our_logits(case):
  """PeftModel.from_pretrained(base, our dir): logits within 1e-4 of ours (combine(base, adapters), unmerged).
  peft's own save_pretrained of that model (with its copies of the embedding layers when they are adapted)
  loads back here to the same adapters."""
  model = peft.PeftModel.from_pretrained(_base_model(case["base_dir"]), case["adapter_dir"])
  diff = np.abs(_hf_logits(model) - case["ours"]).max()
  print(f"peft parity: max|diff|={diff:.2e}")
  assert diff <= 1e-4
  resaved = str(case["root"] / "resaved")
  model.save_pretrained(resaved)
  adapters, lcfg, base_dir, fingerprint = hf_io.load_peft(resaved, case["cfg"])
  assert lcfg.rank == case["lcfg"].rank and lcfg.scaling == case["lcfg"].scaling
  assert set(lcfg.targets) == set(case["lcfg"].targets) and fingerprint is None
  assert jax.tree.structure(adapters) == jax.tree.structure(case["adapters"])
  for a, b in zip(jax.tree.leaves(_host(adapters)), jax.tree.leaves(_host(case["adapters"]))):
    np.testing.assert_array_equal(a, b)


def test_merged_export_loads_in_plain_transformers(case):
  """save_model of lora.merged(params, scaling): a plain HF model whose logits are ours within 1e-4."""
  merged = lora.merged(lora.combine(case["base"], case["adapters"]), case["lcfg"].scaling)
  path = hf_io.save_model(str(case["root"] / "merged"), case["cfg"], merged, case["tok"])
  diff = np.abs(_hf_logits(_base_model(path)) - case["ours"]).max()
  print(f"merged parity: max|diff|={diff:.2e}")
  assert diff <= 1e-4


def test_round_trip_is_exact_and_names_are_peft_s(case):
  """save_peft -> load_peft: the same adapters bitwise, the same LoraConfig, base path and fingerprint; the
  file holds peft's tensor names and shapes (A [r, in], B [out, r]; the embedding's lora_embedding_A/B)."""
  adapters, lcfg, base_dir, fingerprint = hf_io.load_peft(case["adapter_dir"], case["cfg"])
  assert lcfg == case["lcfg"] and base_dir == os.path.abspath(case["base_dir"]) and fingerprint == "0" * 16
  assert jax.tree.structure(adapters) == jax.tree.structure(case["adapters"])
  for a, b in zip(jax.tree.leaves(_host(adapters)), jax.tree.leaves(_host(case["adapters"]))):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  tensors = load_file(os.path.join(case["adapter_dir"], "adapter_model.safetensors"))
  cfg, r = case["cfg"], lcfg.rank
  E, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
  proj = {"self_attn.q_proj": (E, cfg.num_heads * D), "self_attn.k_proj": (E, cfg.num_kv_heads * D),
          "self_attn.v_proj": (E, cfg.num_kv_heads * D), "self_attn.o_proj": (cfg.num_heads * D, E),
          "mlp.gate_proj": (E, cfg.intermediate_size), "mlp.up_proj": (E, cfg.intermediate_size),
          "mlp.down_proj": (cfg.intermediate_size, E)}
  want = {}
  for i in range(cfg.num_layers):
    for module, (n_in, n_out) in proj.items():
      want[f"base_model.model.model.layers.{i}.{module}.lora_A.weight"] = (r, n_in)
      want[f"base_model.model.model.layers.{i}.{module}.lora_B.weight"] = (n_out, r)
  if "embed" in lcfg.targets:
    want.update({"base_model.model.model.embed_tokens.lora_embedding_A": (r, V),
                 "base_model.model.model.embed_tokens.lora_embedding_B": (E, r),
                 "base_model.model.lm_head.lora_A.weight": (r, E), "base_model.model.lm_head.lora_B.weight": (V, r)})
  assert {k: v.shape for k, v in tensors.items()} == want
  assert all(v.dtype == np.float32 for v in tensors.values())
  with open(os.path.join(case["adapter_dir"], "adapter_config.json")) as f:
    raw = json.load(f)
  assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["use_rslora"] == lcfg.rslora
  assert raw["target_modules"] == [lora.HF_MODULES[t] for t in lcfg.targets] and raw["r"] == r


# ----------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A one-layer base and an adapter directory on it (no forward is compiled)."""
  root = tmp_path_factory.mktemp("small")
  base_dir = make_tiny_model_dir(str(root / "base"), "qwen2", hidden_size=16, num_layers=1, num_heads=2,
                                 num_kv_heads=1, seed=0)
  cfg = hf_io.load_config(base_dir)
  lcfg = lora.LoraConfig(rank=2)
  adapters = lora.init_adapters(jax.random.PRNGKey(0), param_shapes(cfg), lcfg, dtype=jnp.bfloat16)
  return dict(root=root, cfg=cfg, adapter_dir=hf_io.save_peft(str(root / "adapter"), cfg, adapters, lcfg, base_dir))


def _copy(small, tmp_path, **config):
  path = str(tmp_path / "copy")
  shutil.copytree(small["adapter_dir"], path)
  file = os.path.join(path, "adapter_config.json")
  with open(file) as f:
    raw = json.load(f)
  raw.update(config)
  with open(file, "w") as f:
    json.dump(raw, f)
  return path


@pytest.mark.parametrize("key,value", [("use_dora", True), ("target_modules", ["q_proj", "c_attn"]),
                                       ("target_modules", "all-linear"), ("peft_type", "IA3"), ("bias", "all"),
                                       ("fan_in_fan_out", True), ("modules_to_save", ["lm_head"]),
                                       ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"v_proj": 4}),
                                       ("layers_to_transform", [0]), ("r", 0)])
def test_a_config_our_model_cannot_run_is_refused_by_key(small, tmp_path, key, value):
  path = _copy(small, tmp_path, **{key: value})
  with pytest.raises(ValueError, match=rf"adapter_config\.json: {key}="):
    hf_io.load_peft(path, small["cfg"])


def test_bad_tensors_and_pickle_weights_are_refused(small, tmp_path):
  assert hf_io.is_peft_dir(small["adapter_dir"]) and not hf_io.is_peft_dir(str(small["root"] / "base"))
  path = _copy(small, tmp_path)
  file = os.path.join(path, "adapter_model.safetensors")
  good = load_file(file)
  q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
  extra = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"  # the base has one layer
  for tensors, match in [({k: v for k, v in good.items() if k != q_a}, r"missing tensor.*q_proj\.lora_A"),
                         ({**good, extra: good[q_a]}, rf"unexpected tensor '{re.escape(extra)}'"),
                         ({**good, q_a: np.zeros((3, 16), np.float32)}, rf"'{re.escape(q_a)}' has shape \(3, 16\)")]:
    save_file(tensors, file)
    with pytest.raises(ValueError, match=match) as e:
      hf_io.load_peft(path, small["cfg"])
    assert file in str(e.value)
  os.remove(file)
  with open(os.path.join(path, "adapter_model.bin"), "wb") as f:
    f.write(b"not loaded")
  with pytest.raises(ValueError, match=r"only pickle adapter weights \['adapter_model\.bin'\]"):
    hf_io.load_peft(path, small["cfg"])


# ----------------------------------------------------------------------------- the eval command


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory):
  """A tied chat base, random adapters on its layers saved with the base's fingerprint (and the tokenizer, as
  training's export does), the same policy merged into a plain model, and another base of the same shapes."""
  import datasets

  root = tmp_path_factory.mktemp("eval_lora")
  tok = build_char_tokenizer(chat_template=CHATML)
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  kw = dict(tokenizer=tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, tie_word_embeddings=True)
  base_dir = make_tiny_model_dir(str(root / "base"), "qwen2", seed=1, **kw)
  other = make_tiny_model_dir(str(root / "other"), "qwen2", seed=2, **kw)
  cfg, base = hf_io.load_model(base_dir)
  lcfg = lora.LoraConfig(rank=4, alpha=16.0)
  adapters = _nonzero_adapters(cfg, lcfg, seed=5, scale=0.3)
  adapter_dir = hf_io.save_peft(str(root / "adapter"), cfg, adapters, lcfg, base_dir,
                                base_fingerprint=lora.fingerprint(base))
  tok.save_pretrained(adapter_dir)
  merged_dir = hf_io.save_model(str(root / "merged"), cfg, lora.merged(lora.combine(base, adapters), lcfg.scaling),
                                tok)
  datasets.Dataset.from_list(GSM).to_parquet(str(root / "gsm.parquet"))
  return dict(root=root, base=base_dir, other=other, adapter=adapter_dir, merged=merged_dir,
              gsm=str(root / "gsm.parquet"))


def _evaluate(d, model_dir, out_dir, *extra):
  argv = ["--model_dir", model_dir, "--data", f"gsm={d['gsm']}", "--out_dir", str(out_dir), "--num_samples", "2",
          "--k", "1,2", "--max_new_tokens", "6", "--reward", "eval_reward_fns:first_lower",
          "--gin_param", "TaskConfig.prompt_format = 'chat'", "--gin_param", "TaskConfig.prompt_key = 'question'",
          *extra]
  return evaluate.main(argv, devices=jax.devices()[:1])


def _outputs(out_dir):
  with open(os.path.join(out_dir, "outputs.jsonl"), encoding="utf-8") as f:
    return [(r["mode"], r["index"], r["completion"], r["passed"]) for r in map(json.loads, f)]


def test_evaluate_takes_an_adapter_dir_like_its_merged_model(eval_dirs, tmp_path):
  """The adapters on their recorded base (unmerged) give the merged export's completions and numbers."""
  adapted = _evaluate(eval_dirs, eval_dirs["adapter"], tmp_path / "adapter")
  merged = _evaluate(eval_dirs, eval_dirs["merged"], tmp_path / "merged")
  assert adapted["base_model"] == os.path.abspath(eval_dirs["base"]) and "base_model" not in merged
  assert _outputs(tmp_path / "adapter") == _outputs(tmp_path / "merged")
  assert adapted["metrics"] == pytest.approx(merged["metrics"])
  assert "eval/gsm/greedy/pass_at_1" in adapted["metrics"]


def test_evaluate_refuses_adapters_on_another_base(eval_dirs, tmp_path):
  with pytest.raises(ValueError, match=r"trained on the base .*base \(weights fingerprint [0-9a-f]{16}\), but the "
                                       r"base given is .*other \(fingerprint [0-9a-f]{16}"):
    _evaluate(eval_dirs, eval_dirs["adapter"], tmp_path, "--base_model", eval_dirs["other"])
  with pytest.raises(ValueError, match=r"--base_model .* is for a PEFT adapter --model_dir"):
    _evaluate(eval_dirs, eval_dirs["merged"], tmp_path, "--base_model", eval_dirs["base"])
